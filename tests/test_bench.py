"""Order planning, protocols end to end on a tiny model, determinism, metrics on a controlled model."""

from __future__ import annotations

import csv
import json
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from conftest import make_model, records, tiny_config
from lemoe.bench import BenchSettings, run_bench, run_order_sensitivity
from lemoe.metrics import agreement, answer_predictions, target_perplexity, token_accuracy
from lemoe.planning import kmeans, plan_order
from lemoe.plots import plot_order_sensitivity

# ----------------------------------------------------------------------------- planning


def _three_clusters() -> torch.Tensor:
    """Twelve points in three tight clusters, shuffled (no pure-noise dimensions: the planner
    standardises every dimension, which would blow such noise up to the signal's size)."""
    torch.manual_seed(0)
    centres = torch.eye(3) * 10
    return torch.cat([centres[c] + 0.1 * torch.randn(4, 3) for c in (0, 1, 2)])[torch.randperm(12)]


def test_plans_partition_the_records():
    points = _three_clusters()
    for mode in ("stream", "random", "cluster"):
        plan = plan_order(points, 4, mode, seed=3)
        assert sorted(plan.order) == list(range(12)) and all(len(b) == 4 for b in plan.batches)
    assert plan_order(points, 5, "stream").batches == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [10, 11]]
    with pytest.raises(ValueError, match="order must be one of"):
        plan_order(points, 4, "alphabetical")


def test_cluster_order_puts_similar_edits_together():
    points = _three_clusters()
    labels = points.argmax(dim=1)
    plan = plan_order(points, 4, "cluster", seed=0)
    assert all(len(set(labels[b].tolist())) == 1 for b in plan.batches)
    stream = plan_order(points, 4, "stream")
    assert plan.within_batch_similarity > 0.9 > stream.within_batch_similarity
    assert plan.between_batch_similarity < plan.within_batch_similarity


def test_kmeans_and_random_order_are_deterministic_per_seed():
    points = torch.nn.functional.normalize(torch.randn(30, 5, generator=torch.Generator().manual_seed(1)), dim=-1)
    assert torch.equal(kmeans(points, 4, seed=7), kmeans(points, 4, seed=7))
    assert plan_order(points, 5, "random", seed=2).order == plan_order(points, 5, "random", seed=2).order
    assert plan_order(points, 5, "random", seed=2).order != plan_order(points, 5, "random", seed=3).order


# ----------------------------------------------------------------------------- protocols


@pytest.mark.parametrize("protocol", ["final", "immediate", "curve"])
def test_protocol_end_to_end_on_a_tiny_model(tokenizer, tmp_path, protocol):
    model = make_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    settings = BenchSettings(data="tiny", T=20, batch_size=5, order="cluster", protocol=protocol, curve_every=2)
    summary = run_bench(model, tokenizer, records(24), settings, tiny_config(max_steps=10), tmp_path)
    for key in ("method", "model", "data", "T", "batch_size", "order", "protocol", "rel", "gen", "loc", "gen_em",
                "routing_consistency", "seconds_per_edit", "peak_rss_mb", "seed", "lemoe_version"):
        assert key in summary, key
    assert summary["T"] == 20 and summary["experts"] == 4 and summary["protocol"] == protocol
    assert 0.0 <= summary["rel"] <= 1.0 and summary["routing_consistency"] == 1.0
    import transformers

    versions = summary["versions"]  # provenance: what the numbers were measured with
    assert versions["transformers"] == transformers.__version__
    assert versions["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert all(versions[k] for k in ("python", "lemoe", "tokenizers", "safetensors")) and summary["git_commit"]
    assert summary["cpu"]["torch_capability"] == torch.backends.cpu.get_cpu_capability()  # timings depend on it
    assert summary["cpu"]["model"] and summary["cpu"]["native_bfloat16"] in (True, False, None)
    lines = [json.loads(line) for line in (tmp_path / "edits.jsonl").read_text().splitlines()]
    assert len(lines) == 20 and sorted(e["index"] for e in lines) == list(range(20))
    assert all(e["routed_expert"] == e["expert"] for e in lines)
    timeline = list(csv.DictReader(open(tmp_path / "timeline.csv")))
    assert [int(r["edits_so_far"]) for r in timeline] == [5, 10, 15, 20]
    if protocol == "immediate":
        assert all("immediate_rel" in e for e in lines) and summary["immediate"] is not None
        assert summary["rel"] == summary["immediate"]["rel"]
    if protocol == "curve":
        assert [bool(r["curve_rel"]) for r in timeline] == [False, True, False, True]
    for name in ("reliability_over_time.png", "routing_heatmap.png", "expert_usage.png"):
        assert (tmp_path / name).stat().st_size > 1000
    # the benchmark unloads its editor: the model is the base model again
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_same_seed_gives_the_same_numbers(tokenizer, tmp_path):
    def numbers(out):
        settings = BenchSettings(data="tiny", T=12, batch_size=4, order="random", seed=5)
        summary = run_bench(make_model("qwen2"), tokenizer, records(12), settings, tiny_config(max_steps=8), out)
        return {k: summary[k] for k in ("rel", "gen", "loc", "gen_em", "routing_consistency", "final", "ppl_after",
                                        "within_batch_similarity", "between_batch_similarity")}

    assert numbers(tmp_path / "a") == numbers(tmp_path / "b")


def test_order_sensitivity_runs_every_order(tokenizer, tmp_path):
    model = make_model("llama")
    settings = BenchSettings(data="tiny", T=12, batch_size=4, seed=3)
    result = run_order_sensitivity(model, tokenizer, records(12), settings, random_orders=2,
                                   config=tiny_config(max_steps=6), out_dir=tmp_path)
    assert [(r["order"], r["seed"]) for r in result["runs"]] == [("random", 3), ("random", 4), ("cluster", 3)]
    saved = json.loads((tmp_path / "order_sensitivity.json").read_text())
    assert saved["runs"] == result["runs"]
    for name in ("random_seed3", "random_seed4", "cluster"):
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        assert summary["order"] == name.split("_")[0] and summary["T"] == 12
    rels = [r["rel"] for r in result["runs"][:2]]
    assert result["spread"]["random"]["rel"]["min"] == min(rels)
    assert result["spread"]["random"]["rel"]["max"] == max(rels)
    assert (tmp_path / "order_sensitivity.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="random_orders must be >= 1"):
        run_order_sensitivity(model, tokenizer, records(12), settings, random_orders=0)


def test_t_larger_than_the_data_is_refused(tokenizer):
    with pytest.raises(ValueError, match="T=30 but the data holds only 4"):
        run_bench(make_model("llama"), tokenizer, records(4), BenchSettings(data="x", T=30))


# ----------------------------------------------------------------------------- metrics on a controlled model


class NumberTokenizer:
    """'3 4 5' -> [3, 4, 5]."""

    pad_token_id, eos_token_id = 0, None

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [int(w) for w in text.split()]}


class SuccessorLM(nn.Module):
    """Predicts token t+1 after token t, with logit 10 (and 0 for every other token)."""

    vocab = 32

    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(max_position_embeddings=64)
        self.embed = nn.Embedding(self.vocab, self.vocab)
        self.embed.weight.data = torch.roll(torch.eye(self.vocab) * 10, shifts=1, dims=1)
        self.head = nn.Linear(self.vocab, self.vocab, bias=False)
        self.head.weight.data = torch.eye(self.vocab)

    @property
    def base_model(self):
        return lambda input_ids, attention_mask, use_cache: SimpleNamespace(last_hidden_state=self.embed(input_ids))

    def get_output_embeddings(self):
        return self.head

    def get_input_embeddings(self):
        return self.embed


def test_reliability_counts_argmax_target_tokens():
    model, tok = SuccessorLM(), NumberTokenizer()
    # after "5" the model says 6, then 7, then 8: "6 7 8" fully right, "6 9" half, "9 9" none
    assert token_accuracy(model, tok, ["3 4 5", "5", "5"], ["6 7 8", "6 9", "9 9"]) == [1.0, 0.5, 0.0]


def test_locality_is_agreement_with_the_unedited_predictions():
    model, tok = SuccessorLM(), NumberTokenizer()
    before = answer_predictions(model, tok, ["1 2", "4"], ["3 4", "9"])
    assert [p.tolist() for p in before] == [[3, 4], [5]]
    assert agreement(before, [torch.tensor([3, 0]), torch.tensor([5])]) == [0.5, 1.0]


def test_target_perplexity_by_hand():
    model, tok = SuccessorLM(), NumberTokenizer()
    log_z = math.log(math.exp(10) + SuccessorLM.vocab - 1)
    right, wrong = log_z - 10, log_z  # NLL of the predicted token and of any other token
    ppl = target_perplexity(model, tok, ["1", "1"], ["2 3", "2 9"])
    assert ppl[0] == pytest.approx(math.exp(right), rel=1e-5)
    assert ppl[1] == pytest.approx(math.exp((right + wrong) / 2), rel=1e-5)


def test_order_sensitivity_figure(tmp_path):
    path = plot_order_sensitivity(tmp_path / "order.png", {
        "rel": {"random (5)": [0.91, 0.95, 0.88, 0.93, 0.9], "cluster": [0.97]},
        "gen": {"random (5)": [0.71, 0.75, 0.68, 0.73, 0.7], "cluster": [0.77]}})
    assert path.stat().st_size > 1000


def test_the_commit_is_read_once_so_commits_made_during_a_run_are_not_credited_with_it(monkeypatch):
    from types import SimpleNamespace

    from lemoe import provenance

    heads = iter(["1111111", "2222222"])
    monkeypatch.setattr(provenance.subprocess, "run", lambda *a, **k: SimpleNamespace(stdout=next(heads) + "\n"))
    provenance.git_commit.cache_clear()
    try:
        assert provenance.git_commit() == "1111111"
        assert provenance.git_commit() == "1111111"  # HEAD moved on; the run's commit did not
        assert provenance.provenance()["git_commit"] == "1111111"
    finally:
        provenance.git_commit.cache_clear()


def test_bfloat16_units_are_read_off_the_cpu_flags(monkeypatch):
    from lemoe import provenance

    for flags, native in ((frozenset({"avx2", "fma"}), False), (frozenset({"avx512f", "avx512_bf16"}), True),
                          (frozenset({"amx_bf16"}), True), (frozenset({"asimd", "bf16"}), True), (None, None)):
        monkeypatch.setattr(provenance, "cpu_flags", lambda flags=flags: flags)
        assert provenance.native_bfloat16_cpu() is native
