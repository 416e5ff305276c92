"""Settings, labeling-config parsing and prompt rules of the backend."""
from __future__ import annotations

import json
import os
import threading

import pytest

from backend.label_config import LabelConfigError, parse_label_config, split_prompts
from backend.prompts import PromptMemory, free_text_from_context, plan_prompts, project_key
from backend.settings import Settings, SettingsError, settings_markdown
from backend_fixtures import BRUSH_CONFIG, MIXED_CONFIG

# -- settings ---------------------------------------------------------------------------------


def test_settings_defaults_without_environment():
    s = Settings.from_env({})
    assert (s.model_name, s.pretrained, s.device, s.precision) == ("ViT-B-16", "openai", "auto", "fp32")
    assert (s.image_size, s.resize_mode, s.gem_depth, s.ss_attn_iter, s.ss_attn_temp) == (448, "short", 7, 1, None)
    assert s.outputs == ("brush", "polygon", "rectangle")
    assert (s.host, s.port, s.workers, s.threads, s.log_level) == ("0.0.0.0", 9090, 1, 8, "INFO")
    assert not s.basic_auth_enabled


def test_settings_parse_environment():
    s = Settings.from_env({
        "GEM_MODEL": "ViT-L-14", "GEM_SS_ATTN_TEMP": "0.5", "GEM_OUTPUTS": "Polygon, brush",
        "GEM_PRECISION": "FP16", "GEM_DEVICE": "cuda:1", "LABEL_STUDIO_URL": "http://ls:8080/",
        "LOG_LEVEL": "debug", "BASIC_AUTH_USER": "u", "BASIC_AUTH_PASS": "p", "GEM_REMEMBER_PROMPTS": "no",
    })
    assert s.model_name == "ViT-L-14" and s.ss_attn_temp == 0.5 and s.outputs == ("polygon", "brush")
    assert s.precision == "fp16" and s.device == "cuda:1" and s.label_studio_url == "http://ls:8080"
    assert s.log_level == "DEBUG" and s.basic_auth_enabled and s.remember_prompts is False


def test_settings_errors_name_every_bad_variable():
    with pytest.raises(SettingsError) as info:
        Settings.from_env({"GEM_IMAGE_SIZE": "big", "PORT": "70000", "GEM_OUTPUTS": "mask",
                           "LABEL_STUDIO_URL": "ls:8080", "GEM_PRECISION": "fp8", "BASIC_AUTH_PASS": "secret"})
    text = str(info.value)
    for name in ("GEM_IMAGE_SIZE", "PORT", "GEM_OUTPUTS", "LABEL_STUDIO_URL", "GEM_PRECISION", "BASIC_AUTH_USER"):
        assert name in text
    assert "secret" not in text


def test_secrets_stay_out_of_repr_and_public_dict():
    s = Settings.from_env({"LABEL_STUDIO_API_KEY": "tok-123", "BASIC_AUTH_USER": "u", "BASIC_AUTH_PASS": "pw-456"})
    assert "tok-123" not in repr(s) and "pw-456" not in repr(s)
    public = json.dumps(s.public_dict())
    assert "tok-123" not in public and "pw-456" not in public


def test_settings_markdown_lists_every_variable():
    table = settings_markdown()
    for name in ("GEM_MODEL", "GEM_PRETRAINED", "GEM_MODEL_CONFIG", "GEM_DEVICE", "GEM_PRECISION", "GEM_IMAGE_SIZE",
                 "GEM_RESIZE_MODE", "GEM_DEPTH", "GEM_SS_ATTN_ITER", "GEM_SS_ATTN_TEMP", "GEM_BATCH_SIZE",
                 "GEM_OUTPUTS", "MODEL_DIR", "LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY", "BASIC_AUTH_USER",
                 "BASIC_AUTH_PASS", "HOST", "PORT", "WORKERS", "THREADS", "LOG_LEVEL", "MODEL_VERSION",
                 "GEM_FETCH_TIMEOUT", "GEM_FETCH_MAX_MB"):
        assert f"`{name}`" in table


def test_cli_help_lists_settings(capsys):
    from backend.__main__ import main
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "gunicorn -c backend/gunicorn.conf.py backend.wsgi:app" in out and "LABEL_STUDIO_API_KEY" in out


# -- labeling config --------------------------------------------------------------------------


@pytest.mark.parametrize("tag,kind,rtype", [("BrushLabels", "brush", "brushlabels"),
                                            ("PolygonLabels", "polygon", "polygonlabels"),
                                            ("RectangleLabels", "rectangle", "rectanglelabels")])
def test_each_control_type_alone(tag, kind, rtype):
    plan = parse_label_config(BRUSH_CONFIG.replace("BrushLabels", tag))
    (control,) = plan.controls
    assert (control.name, control.kind, control.result_type, control.to_name) == ("brush", kind, rtype, "image")
    assert [l.value for l in control.labels] == ["Bright", "Dark"]
    assert [l.prompts for l in control.labels] == [("Bright",), ("Dark",)]
    assert plan.images[0].data_key == "image"


def test_mixed_config_and_textarea():
    plan = parse_label_config(MIXED_CONFIG)
    assert [(c.name, c.kind) for c in plan.controls] == [("brush", "brush"), ("poly", "polygon"), ("rect", "rectangle")]
    assert plan.prompt_inputs == ("prompt",)


def test_outputs_setting_filters_controls():
    plan = parse_label_config(MIXED_CONFIG, outputs=("polygon",))
    assert [c.name for c in plan.controls] == ["poly"]
    with pytest.raises(LabelConfigError, match="GEM_OUTPUTS"):
        parse_label_config(BRUSH_CONFIG, outputs=("rectangle",))


def test_several_images_each_control_on_its_own():
    config = """<View>
      <Image name="left" value="$a"/><Image name="right" value="$b"/>
      <BrushLabels name="b1" toName="left"><Label value="Cat"/></BrushLabels>
      <RectangleLabels name="r2" toName="right"><Label value="Dog"/></RectangleLabels>
      <Text name="caption" value="$text"/>
      <PolygonLabels name="p3" toName="caption"><Label value="X"/></PolygonLabels>
    </View>"""
    plan = parse_label_config(config)
    assert [(c.name, c.to_name) for c in plan.controls] == [("b1", "left"), ("r2", "right")]
    assert [(i.name, i.data_key) for i in plan.images] == [("left", "a"), ("right", "b")]
    assert any("p3" in s and "Text" in s for s in plan.skipped)


@pytest.mark.parametrize("config", [
    "<View><Image name='i' value='$image'/><Choices name='c' toName='i'><Choice value='a'/></Choices></View>",
    "<View><Text name='t' value='$text'/><Labels name='l' toName='t'><Label value='a'/></Labels></View>",
    "<View><Image name='i' value='$image'/><KeyPointLabels name='k' toName='i'><Label value='a'/></KeyPointLabels></View>",
    "<View><Image name='i' value='$image'/><BrushLabels name='b' toName='i'></BrushLabels></View>",
    "",
])
def test_nothing_to_predict_lists_what_is_supported(config):
    with pytest.raises(LabelConfigError) as info:
        parse_label_config(config)
    assert "BrushLabels, PolygonLabels or RectangleLabels" in str(info.value)


def test_malformed_xml_is_a_config_error():
    with pytest.raises(LabelConfigError, match="cannot be parsed"):
        parse_label_config("<View><Image name='i' value='$image'>")


def test_label_prompts_attribute_and_alias():
    config = """<View><Image name="image" value="$image"/>
      <PolygonLabels name="poly" toName="image">
        <Label value="Car" prompts="car; automobile;; pickup truck ;car"/>
        <Label value="Person" alias="P"/>
      </PolygonLabels></View>"""
    (control,) = parse_label_config(config).controls
    car, person = control.labels
    assert car == type(car)("Car", ("car", "automobile", "pickup truck"))
    assert person.value == "P" and person.prompts == ("Person",)   # results carry alias, CLIP reads value
    assert control.find_label("AUTOMOBILE") is car and control.find_label("p") is person
    assert control.find_label("truck") is None


def test_split_prompts():
    assert split_prompts(" a  dog ;A dog; cat;") == ("a dog", "cat")


# -- prompts ----------------------------------------------------------------------------------


def _context(*texts, to_name="image"):
    return {"result": [{"type": "textarea", "from_name": "prompt", "to_name": to_name, "value": {"text": list(texts)}}]}


def test_batch_predicts_every_label_with_its_prompts():
    plan = parse_label_config(MIXED_CONFIG)
    prompts = plan_prompts(plan, None)
    assert not prompts.interactive
    assert [[(lp.label, lp.prompts) for lp in c.labels] for c in prompts.controls] == \
        [[("Bright", ("Bright",)), ("Dark", ("Dark",))]] * 3


def test_free_text_attaches_to_matching_label_or_first_label():
    plan = parse_label_config(MIXED_CONFIG)
    prompts = plan_prompts(plan, _context("dark", "a red car; left side"))
    assert prompts.interactive
    assert prompts.free_text == {"image": ("dark", "a red car", "left side")}
    brush = prompts.controls[0]
    assert [(lp.label, lp.prompts) for lp in brush.labels] == [
        ("Dark", ("Dark",)), ("Bright", ("a red car", "left side"))]


def test_free_text_with_unknown_to_name_applies_to_all_images():
    plan = parse_label_config(BRUSH_CONFIG)
    assert free_text_from_context(_context("cat", to_name="elsewhere"), plan) == {"image": ("cat",)}
    assert free_text_from_context({"result": [{"type": "keypointlabels", "value": {}}]}, plan) == {}
    assert free_text_from_context("junk", plan) == {}


def test_remembered_prompt_is_added_to_batch():
    plan = parse_label_config(BRUSH_CONFIG)
    prompts = plan_prompts(plan, None, remembered=("a cat",))
    assert not prompts.interactive
    assert [(lp.label, lp.prompts) for lp in prompts.controls[0].labels] == [
        ("Bright", ("Bright", "a cat")), ("Dark", ("Dark",))]


def test_interactive_context_without_text_plans_nothing_even_with_a_remembered_prompt():
    plan = parse_label_config(MIXED_CONFIG)
    for context in ({"result": []}, {}, {"result": [{"type": "keypointlabels", "value": {}}]}):
        prompts = plan_prompts(plan, context, remembered=("a cat",))
        assert prompts.interactive and prompts.controls == () and prompts.free_text == {}


def test_remembering_prompts_is_off_by_default():
    assert Settings.from_env({}).remember_prompts is False
    assert Settings.from_env({"GEM_REMEMBER_PROMPTS": "true"}).remember_prompts is True


def test_prompt_memory_persists_and_is_thread_safe(tmp_path):
    path = str(tmp_path / "state" / "prompts.json")
    memory = PromptMemory(path)
    assert memory.get("1.123") == ()

    def write(n):
        for k in range(10):
            memory.set(f"{n}.999", (f"prompt {n}-{k}",))
    threads = [threading.Thread(target=write, args=(n,)) for n in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    again = PromptMemory(path)
    for n in range(5):
        assert again.get(f"{n}.1") == (f"prompt {n}-9",)   # keyed by project id, not the timestamp
    again.set("3", ())
    assert PromptMemory(path).get("3") == ()
    assert project_key("7.1795633591") == "7" and project_key(None) is None


def test_documented_settings_table_is_current():
    """README.md / docs/BACKEND.md carry the generated table between markers; it must not drift."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    checked = 0
    for doc in (root / "README.md", root / "docs" / "BACKEND.md"):
        text = doc.read_text(encoding="utf-8") if doc.is_file() else ""
        if "<!-- settings-table:start -->" not in text:
            continue
        table = text.split("<!-- settings-table:start -->", 1)[1].split("<!-- settings-table:end -->", 1)[0]
        assert table.strip() == settings_markdown().strip(), \
            f"{doc.name}: regenerate with `python -m backend.settings --markdown`"
        checked += 1
    if not checked:
        pytest.skip("no document carries the settings table markers")


def test_torch_threads_setting_is_applied_when_the_model_loads(tiny_model_files, tmp_path, monkeypatch):
    import torch
    from backend.model import GemBackendModel

    assert Settings.from_env({}).torch_threads == 0
    with pytest.raises(SettingsError, match="GEM_TORCH_THREADS"):
        Settings.from_env({"GEM_TORCH_THREADS": "-1"})
    name, config_path, checkpoint = tiny_model_files
    settings = Settings.from_env({"GEM_MODEL": name, "GEM_MODEL_CONFIG": str(config_path),
                                  "GEM_PRETRAINED": str(checkpoint), "GEM_DEVICE": "cpu",
                                  "GEM_IMAGE_SIZE": "32", "MODEL_DIR": str(tmp_path),
                                  "GEM_TORCH_THREADS": "1"})
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    model = GemBackendModel(settings)
    model.load()
    assert model.ready and calls == [1]


def test_mode_slide_and_pamr_settings_reach_the_model_and_the_version(tiny_model_files, tmp_path):
    from backend.pipeline import compute_model_version, load_predictor
    from backend.settings import MODES
    from gem_model.model import MODES as LIBRARY_MODES

    assert MODES == LIBRARY_MODES
    base = Settings.from_env({})
    assert (base.method, base.slide_crop, base.pamr_iters) == ("gem", 0, 0)
    with pytest.raises(SettingsError, match="GEM_METHOD"):
        Settings.from_env({"GEM_METHOD": "sclip"})
    from backend.settings import settings_rows
    names = [row[1] for row in settings_rows()]
    assert len(names) == len(set(names)), "two settings share an environment variable"
    versions = {compute_model_version(Settings.from_env(env)) for env in (
        {}, {"GEM_METHOD": "naclip"}, {"GEM_SLIDE_CROP": "448"},
        {"GEM_SLIDE_CROP": "448", "GEM_SLIDE_STRIDE": "112"}, {"GEM_PAMR_ITERS": "10"})}
    assert len(versions) == 5
    # The stride alone changes nothing while sliding windows are off.
    assert compute_model_version(Settings.from_env({"GEM_SLIDE_STRIDE": "112"})) == compute_model_version(base)

    name, config_path, checkpoint = tiny_model_files
    settings = Settings.from_env({"GEM_MODEL": name, "GEM_MODEL_CONFIG": str(config_path),
                                  "GEM_PRETRAINED": str(checkpoint), "GEM_DEVICE": "cpu",
                                  "GEM_IMAGE_SIZE": "32", "MODEL_DIR": str(tmp_path),
                                  "GEM_METHOD": "clearclip", "GEM_SLIDE_CROP": "32", "GEM_SLIDE_STRIDE": "16",
                                  "GEM_PAMR_ITERS": "3"})
    model = load_predictor(settings).model
    assert (model.mode, model.slide_crop, model.slide_stride, model.pamr_iters) == ("clearclip", 32, 16, 3)
    # Learning embeds annotations with the same method and windows as the prediction path: the
    # server's learner uses the server's predictor, `python -m backend.learning rebuild` this very
    # load_predictor (backend/learning.py imports it; it has no loader of its own).
    import backend.learning

    assert not hasattr(backend.learning, "_load_predictor")


def test_check_validates_model_files_and_prints_every_setting(tmp_path, monkeypatch, capsys):
    from backend.settings import main, settings_rows

    for key in [k for k in os.environ if k.startswith(("GEM_", "LABEL_STUDIO_"))]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("MODEL_DIR", str(tmp_path))
    monkeypatch.setenv("GEM_PRETRAINED", str(tmp_path / "missing.pt"))
    assert main(["--check"]) == 2
    error = capsys.readouterr().err
    assert "GEM_PRETRAINED" in error and "no such file" in error
    monkeypatch.setenv("GEM_PRETRAINED", "none")
    monkeypatch.setenv("GEM_MIN_SIMILARITY", "0.2")
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", "k" * 20)
    assert main(["--check"]) == 0
    captured = capsys.readouterr()
    printed = dict(line.split("=", 1) for line in captured.out.splitlines())
    assert set(printed) == {env for _, env, *_ in settings_rows()}          # every setting, region ones too
    assert printed["GEM_MIN_SIMILARITY"] == "0.2" and printed["GEM_PRETRAINED"] == "none"
    assert printed["LABEL_STUDIO_API_KEY"] == "<set>" and "k" * 20 not in captured.out
    assert "LABEL_STUDIO_URL" in captured.err                               # the key-without-URL warning
