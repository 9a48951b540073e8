"""The classic-model recipe suite: generation (idempotent, never clobbering edits), the published
architectures (parameter counts and exported config.json against the official ones), every
config valid, and every stage of every nano recipe run in a chain (slow)."""
from __future__ import annotations

import contextlib
import io
import json
import runpy
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from model.build import count_params
from model.hf_config import config_to_hf
from model.presets import CLASSIC, classic_config
from model.transformer import Transformer
from utils.config import read_yaml, validate
from utils.paths import REPO_ROOT
from utils.recipes import DATA_COMMANDS, FAMILIES, SIZES, STAGE_NAMES, STAGES
from utils.setup_classic_models import MANIFEST

SETUP = REPO_ROOT / "utils" / "setup_classic_models.py"

# The official config.json of each `full` size, architecture fields only (what our ModelConfig
# describes; serving knobs such as torch_dtype, bos/eos ids or use_cache are left out).
OFFICIAL = {
    "deepseek_v3": {  # https://huggingface.co/deepseek-ai/DeepSeek-V3/blob/main/config.json
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "vocab_size": 129280,
        "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
        "num_attention_heads": 128, "num_key_value_heads": 128, "n_shared_experts": 1, "n_routed_experts": 256,
        "routed_scaling_factor": 2.5, "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64,
        "v_head_dim": 128, "qk_nope_head_dim": 128, "topk_method": "noaux_tc", "n_group": 8, "topk_group": 4,
        "num_experts_per_tok": 8, "first_k_dense_replace": 3, "norm_topk_prob": True, "scoring_func": "sigmoid",
        "hidden_act": "silu", "max_position_embeddings": 163840, "rms_norm_eps": 1e-06, "rope_theta": 10000,
        "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                         "original_max_position_embeddings": 4096, "type": "yarn"},
        "tie_word_embeddings": False, "attention_bias": False, "num_nextn_predict_layers": 1,
    },
    "llama3": {  # https://huggingface.co/meta-llama/Llama-3.1-8B/blob/main/config.json
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "hidden_act": "silu", "max_position_embeddings": 131072, "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
        "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False, "head_dim": 128,
    },
    "gemma2": {  # https://huggingface.co/google/gemma-2-2b/blob/main/config.json
        "architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", "vocab_size": 256000, "hidden_size": 2304,
        "intermediate_size": 9216, "num_hidden_layers": 26, "num_attention_heads": 8, "num_key_value_heads": 4,
        "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-06, "rope_theta": 10000.0, "query_pre_attn_scalar": 256, "sliding_window": 4096,
        "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0, "attention_bias": False,
    },
    "gemma3": {  # https://huggingface.co/google/gemma-3-1b-pt/blob/main/config.json
        "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "vocab_size": 262144,
        "hidden_size": 1152, "intermediate_size": 6912, "num_hidden_layers": 26, "num_attention_heads": 4,
        "num_key_value_heads": 1, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
        "max_position_embeddings": 32768, "rms_norm_eps": 1e-06, "rope_theta": 1000000, "rope_local_base_freq": 10000,
        "rope_scaling": None, "query_pre_attn_scalar": 256, "sliding_window": 512, "sliding_window_pattern": 6,
        "attn_logit_softcapping": None, "final_logit_softcapping": None, "attention_bias": False,
    },
    "qwen3": {  # https://huggingface.co/Qwen/Qwen3-0.6B/blob/main/config.json
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 151936, "hidden_size": 1024,
        "intermediate_size": 3072, "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8,
        "head_dim": 128, "hidden_act": "silu", "max_position_embeddings": 40960, "rms_norm_eps": 1e-06,
        "rope_theta": 1000000, "rope_scaling": None, "tie_word_embeddings": True, "attention_bias": False,
        "use_sliding_window": False, "sliding_window": None, "max_window_layers": 28,
    },
    "mistral": {  # https://huggingface.co/mistralai/Mistral-7B-v0.1/blob/main/config.json
        "architectures": ["MistralForCausalLM"], "model_type": "mistral", "vocab_size": 32000, "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "hidden_act": "silu", "max_position_embeddings": 32768, "rms_norm_eps": 1e-05, "rope_theta": 10000.0,
        "sliding_window": 4096, "tie_word_embeddings": False,
    },
}
# Published totals (model cards / papers): (total, active, source). DeepSeek-V3: "671B total
# parameters with 37B activated for each token" (main model; the 14B MTP module apart).
PUBLISHED = {
    "deepseek_v3": (671e9, 37e9, "DeepSeek-V3 technical report, abstract"),
    "llama3": (8.03e9, None, "Llama-3.1-8B model card: 8.03B"),
    "gemma2": (2.61e9, None, "Gemma 2 report, table 1 / model card: 2.61B (2,614,341,888)"),
    "gemma3": (1.0e9, None, "Gemma 3 report, table 1: 1B (999,885,952)"),
    "qwen3": (0.596e9, None, "Qwen3-0.6B: 0.6B (596,049,920 with tied embeddings)"),
    "mistral": (7.24e9, None, "Mistral 7B: 7.24B (7,241,732,096)"),
}


def _norm_rope(value):
    if isinstance(value, dict):  # "type" is the old spelling of "rope_type"; numbers compare as floats
        return {("rope_type" if k == "type" else k): (float(v) if isinstance(v, (int, float)) and not isinstance(v, bool)
                                                      else v) for k, v in value.items()}
    return value


def _same(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) == float(b)
    return _norm_rope(a) == _norm_rope(b)


def test_classic_families_match_the_generator():
    archs = [a.key for arch_list in FAMILIES.values() for a in arch_list]
    assert sorted(archs) == sorted(CLASSIC) and set(PUBLISHED) == set(CLASSIC) == set(OFFICIAL)
    assert all(set(CLASSIC[k]) == set(SIZES) for k in CLASSIC)


@pytest.mark.parametrize("arch", sorted(CLASSIC))
def test_full_size_counts_equal_the_published_totals(arch):
    counts = count_params(classic_config(arch, "full"))
    total, active, source = PUBLISHED[arch]
    assert abs(counts["total"] - total) / total < 0.005, (arch, counts, source)
    if active is not None:  # the published 37B is rounded: the exact count is 37.55B (same below with transformers)
        assert abs(counts["active"] - active) / active < 0.02, (arch, counts, source)


@pytest.mark.parametrize("arch", sorted(CLASSIC))
def test_full_size_exports_the_official_config(arch):
    exported = config_to_hf(classic_config(arch, "full"))
    official = dict(OFFICIAL[arch])
    pattern = official.pop("sliding_window_pattern", None)
    for key, value in official.items():
        assert key in exported and _same(exported[key], value), (arch, key, exported.get(key), value)
    if pattern is not None:  # Gemma 3: every 6th layer global, as layer_types
        assert exported["layer_types"] == ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
                                           for i in range(official["num_hidden_layers"])]


@pytest.mark.parametrize("arch", sorted(CLASSIC))
def test_full_size_counts_equal_transformers(arch):
    """An independent count: transformers builds the exported config on the meta device."""
    transformers = pytest.importorskip("transformers")
    hf = config_to_hf(classic_config(arch, "full"))
    hf_cfg = transformers.AutoConfig.for_model(**{k: v for k, v in hf.items() if k != "architectures"})
    if arch == "deepseek_v3":
        hf_cfg.num_nextn_predict_layers = 0  # transformers builds no MTP module; ours is counted apart
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf_cfg)
    theirs = sum(p.numel() for p in model.parameters())
    assert count_params(classic_config(arch, "full"))["total"] == theirs


def _run(*args: str, cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_generate_is_idempotent_and_keeps_edits(tmp_path):
    out = tmp_path / "suite"
    first = _run(str(SETUP), "--out_dir", str(out), "--runs_dir", "runs/x")
    assert first.returncode == 0, first.stderr
    recipes = sum(len(a) for a in FAMILIES.values()) * len(SIZES)
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and p.name != MANIFEST)
    assert len(files) == recipes * len(STAGES) + len(FAMILIES)
    assert f"{len(files)} created" in first.stdout
    assert sorted(f for f in files if f.endswith("README.md")) == sorted(f"{f}/README.md" for f in FAMILIES)
    assert sorted(p.stem for p in (out / "deepseek" / "v3_nano").iterdir()) == sorted(STAGE_NAMES)

    again = _run(str(SETUP), "--out_dir", str(out), "--runs_dir", "runs/x")
    assert f"0 created, 0 updated, {len(files)} unchanged" in again.stdout

    edited = out / "llama" / "llama3_nano" / "0_pretrain.yaml"
    edited.write_text(edited.read_text().replace("max_steps: 300", "max_steps: 7"))
    kept = _run(str(SETUP), "--out_dir", str(out), "--runs_dir", "runs/x", "--families", "llama")
    assert "1 skipped" in kept.stdout and "llama/llama3_nano/0_pretrain.yaml" in kept.stderr
    assert "max_steps: 7" in edited.read_text()
    forced = _run(str(SETUP), "--out_dir", str(out), "--runs_dir", "runs/x", "--families", "llama", "--force")
    assert "1 overwritten" in forced.stdout and "max_steps: 7" not in edited.read_text()


def test_filters_write_only_what_was_asked(tmp_path):
    out = tmp_path / "suite"
    proc = _run(str(SETUP), "--out_dir", str(out), "--families", "gemma,mistral", "--sizes", "nano")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["gemma", "mistral"]
    assert sorted(p.name for p in (out / "gemma").iterdir() if p.is_dir()) == ["gemma2_nano", "gemma3_nano"]


@pytest.mark.parametrize("args, message", [
    (["--families", "lama"], "unknown family 'lama' (did you mean 'llama'?)"),
    (["--sizes", "nanoo"], "unknown size 'nanoo' (did you mean 'nano'?)"),
    (["--out_dir", "README.md"], "is a file, not a directory"),
])
def test_bad_input_is_one_line_and_exit_2(args, message):
    proc = _run(str(SETUP), *args)
    assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def _schema(stage: str):
    from align.config import AlignConfig
    from align.rl_config import RLConfig
    from eval.config import EvalConfig
    from finetune.config import SFTConfig
    from utils.config import ExperimentConfig

    return {"pretrain": ExperimentConfig, "sft": SFTConfig, "align": AlignConfig, "rl": RLConfig,
            "eval": EvalConfig}[next(s.kind for s in STAGES if s.name == stage)]


@pytest.fixture(scope="module")
def suite(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("suite")
    proc = _run(str(SETUP), "--out_dir", str(out))
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.mark.parametrize("size", SIZES)
def test_every_config_validates_and_its_model_builds_on_meta(suite, size):
    for path in sorted(suite.glob(f"*/*_{size}/*.yaml")):
        cfg = validate(read_yaml(path), _schema(path.stem))
        assert cfg.recipe.stage == path.stem and cfg.recipe.name == f"{path.parent.parent.name}/{path.parent.name}"
        if path.stem == "0_pretrain":
            with torch.device("meta"):
                model = Transformer(cfg.model)
            assert sum(p.numel() for p in model.parameters()) > 0
        else:  # every later stage continues from an earlier one's final
            assert len(cfg.recipe.needs) == 1 and cfg.recipe.needs[0].path.parts[-2:] == ("checkpoints", "final")


def test_a_stage_run_too_early_names_the_command(tmp_path):
    out = tmp_path / "suite"
    assert _run(str(SETUP), "--out_dir", str(out), "--runs_dir", str(tmp_path / "runs"), "--families", "qwen3",
                "--sizes", "nano").returncode == 0
    proc = _run("align/train_online.py", "--config_path", str(out / "qwen3" / "qwen3_nano" / "3_rlhf_grpo.yaml"))
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "1_sft_qlora/checkpoints/final, which does not exist yet: run `python finetune/peft/qlora/" \
           f"sft_qlora_train.py --config_path {out}/qwen3/qwen3_nano/1_sft_qlora.yaml` first" in proc.stderr


# ---------------------------------------------------------------------------- the chain (slow)
FAST = ["training.max_steps=2", "training.eval_interval=2", "training.eval_steps=1", "checkpointing.save_interval=2",
        "logging.sample_interval=0"]
PER_KIND = {  # a couple of steps, a few prompts: the chain, not the quality
    # micro-batches of one group, ended early by a stop string: the rollout's micro-batches differ in width
    "rl": ["rl.val_prompts=4", "rl.prompts_per_step=2", "rl.group_size=2", "rl.sampling.max_new_tokens=8",
           "training.batch_size=2", 'rl.sampling.stop=["e"]'],
}
PER_STAGE = {  # a frozen reference instead of precomputing the reference log-probs of every pair
    "3_rlhf_dpo": ["align.reference=frozen"], "3_rlhf_kto": ["align.reference=frozen"],
}




@pytest.fixture(scope="module")
def demo_data_dir(tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("data")
    for cmd in DATA_COMMANDS:
        proc = _run(*cmd, "--data_dir", str(data))
        assert proc.returncode == 0, (cmd, proc.stderr[-2000:])
    return data


def _run_stage(script: str, argv: list[str]) -> str:
    """The stage script as a user runs it, in this process (no interpreter start-up per stage)."""
    old = sys.argv
    sys.argv = [script, *argv]
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            runpy.run_path(str(REPO_ROOT / script), run_name="__main__")
    except SystemExit as e:
        if e.code not in (0, None):
            raise AssertionError(f"{script} {' '.join(argv)} exited {e.code}: {err.getvalue()[-2000:]}") from None
    finally:
        sys.argv = old
    return err.getvalue()


@pytest.mark.slow
@pytest.mark.parametrize("recipe", [f"{fam}/{a.prefix}_nano" for fam, archs in FAMILIES.items() for a in archs])
def test_every_nano_stage_runs_chained(tmp_path, demo_data_dir, recipe):
    family = recipe.split("/")[0]
    out, runs = tmp_path / "configs", tmp_path / "runs"
    proc = _run(str(SETUP), "--out_dir", str(out), "--runs_dir", str(runs), "--families", family, "--sizes", "nano",
                "--data_dir", str(demo_data_dir))
    assert proc.returncode == 0, proc.stderr
    torch.set_num_threads(2)
    for stage in STAGES:
        config = out / recipe / f"{stage.name}.yaml"
        if stage.kind == "eval":
            _run_stage(stage.script, ["--config_path", str(config), "--limit", "2", "--tasks", "ppl,gsm8k",
                                      "--set", "eval.max_gen_toks=8"])
            continue
        sets = [x for kv in FAST + PER_KIND.get(stage.kind, []) + PER_STAGE.get(stage.name, []) for x in ("--set", kv)]
        t0 = time.perf_counter()
        _run_stage(stage.script, ["--config_path", str(config), *sets])
        print(f"{recipe} {stage.name}: {time.perf_counter() - t0:.1f}s")
        assert (runs / recipe / stage.name / "checkpoints" / "final").is_dir(), stage.name
    results = json.loads((runs / recipe / "4_eval" / "results.json").read_text())
    assert set(results["results"]) == {"ppl", "gsm8k"}
