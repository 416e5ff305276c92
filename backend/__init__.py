"""Label Studio ML backend that turns text prompts into GEM pre-annotations.

Data flows one way (see docs/ARCHITECTURE.md):
labeling config -> prompts -> images -> GEM heatmaps -> regions -> Label Studio results.
"""
