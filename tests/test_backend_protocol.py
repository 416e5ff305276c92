"""GEM_PROTOCOL presets, GEM_PAMR_DILATIONS and GEM_POS_EMBED in the backend's settings."""
import pytest

from backend.pipeline import compute_model_version, load_predictor
from backend.settings import Settings, SettingsError


def test_protocol_presets_set_the_backend_knobs_that_exist():
    naclip = Settings.from_env({"GEM_PROTOCOL": "naclip"})
    assert (naclip.method, naclip.image_size, naclip.slide_crop, naclip.slide_stride, naclip.pamr_iters,
            naclip.pamr_dilations, naclip.pos_embed) == ("naclip", 336, 224, 112, 10, (8, 16), "authors")
    clear = Settings.from_env({"GEM_PROTOCOL": "clearclip"})
    assert (clear.method, clear.image_size, clear.slide_crop, clear.slide_stride, clear.pamr_iters,
            clear.pos_embed) == ("clearclip", 448, 448, 224, 0, "authors")
    default = Settings.from_env({})
    gem = Settings.from_env({"GEM_PROTOCOL": "gem"})
    assert default.protocol == "" and gem.replace(protocol="") == default


def test_a_variable_that_is_set_overrides_the_preset():
    s = Settings.from_env({"GEM_PROTOCOL": "naclip", "GEM_PAMR_ITERS": "0", "GEM_IMAGE_SIZE": "448",
                           "GEM_SLIDE_CROP": "0"})
    assert (s.method, s.pamr_iters, s.image_size, s.slide_crop, s.pos_embed) == ("naclip", 0, 448, 0, "authors")
    blank = Settings.from_env({"GEM_PROTOCOL": "naclip", "GEM_PAMR_ITERS": " "})   # blank = unset
    assert blank.pamr_iters == 10


@pytest.mark.parametrize("env,name", [({"GEM_PROTOCOL": "sclip"}, "GEM_PROTOCOL"),
                                      ({"GEM_PAMR_DILATIONS": "0,8"}, "GEM_PAMR_DILATIONS"),
                                      ({"GEM_PAMR_DILATIONS": "eight"}, "GEM_PAMR_DILATIONS"),
                                      ({"GEM_POS_EMBED": "nearest"}, "GEM_POS_EMBED")])
def test_bad_values_name_their_variable(env, name):
    with pytest.raises(SettingsError, match=name):
        Settings.from_env(env)


def test_model_version_changes_only_where_results_change():
    version = lambda env: compute_model_version(Settings.from_env(env))   # noqa: E731
    base = version({})
    assert version({"GEM_PAMR_DILATIONS": "8,16"}) == base       # PAMR off: dilations unused
    assert version({"GEM_POS_EMBED": "antialias"}) == base
    assert version({"GEM_POS_EMBED": "authors"}) != base
    assert version({"GEM_PAMR_ITERS": "10"}) != version({"GEM_PAMR_ITERS": "10", "GEM_PAMR_DILATIONS": "8,16"})


def test_dilations_and_positional_embeddings_reach_the_model(tiny_model_files, tmp_path):
    name, config_path, checkpoint = tiny_model_files
    settings = Settings.from_env({"GEM_MODEL": name, "GEM_MODEL_CONFIG": str(config_path),
                                  "GEM_PRETRAINED": str(checkpoint), "GEM_DEVICE": "cpu",
                                  "GEM_IMAGE_SIZE": "32", "MODEL_DIR": str(tmp_path), "GEM_PROTOCOL": "naclip",
                                  "GEM_SLIDE_CROP": "32", "GEM_SLIDE_STRIDE": "16"})
    model = load_predictor(settings).model
    assert (model.mode, model.pamr_iters, model.pamr_dilations, model.pos_embed_resize, model.slide_crop) == \
        ("naclip", 10, (8, 16), "authors", 32)
