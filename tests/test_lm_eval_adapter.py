import json

import jax
import numpy as np
import pytest

import lm_eval
from lm_eval.api.instance import Instance
from lm_eval.tasks import TaskManager

from puzzlemoe_jax.lm_eval_adapter import PuzzleMoELM
from puzzlemoe_jax.models import forward
from puzzlemoe_jax.random_checkpoint import write_tiny_checkpoint

TASK = """task: tiny_local_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
"""


@pytest.fixture(scope="module")
def byte_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("lm_eval")
    src = write_tiny_checkpoint(d / "hf", "mixtral", vocab_size=256, num_layers=1)
    from convert import main as convert_main
    # float32 activations, so padded (batched) and unpadded forwards agree to float32 rounding
    assert convert_main(["mixtral", "--src", str(src), "--out", str(d / "m"), "--ratio", "0.5",
                         "--dtype", "float32", "--quiet"]) == 0
    return d / "m"


def direct_logprob(model, context: str, continuation: str) -> float:
    ids = list(context.encode()) + list(continuation.encode())
    logp = np.asarray(jax.nn.log_softmax(forward(model, np.asarray([ids], np.int32)).astype(np.float32), -1))[0]
    start = len(context.encode())
    return float(sum(logp[t - 1, ids[t]] for t in range(start, len(ids))))


def test_loglikelihood_matches_a_direct_forward(byte_model):
    lm = PuzzleMoELM(str(byte_model), batch_size=2)
    pairs = [("The cat", " sat"), ("A", "bc"), ("Hello, world", "!"), ("xyz", " 123 456")]
    got = lm.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)])
    for (c, x), (lp, greedy) in zip(pairs, got):
        assert lp == pytest.approx(direct_logprob(lm.model, c, x), rel=1e-4, abs=1e-3)
        assert lp < 0 and isinstance(greedy, bool)
    rolling = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, ("some text here",), 0)])[0]
    assert rolling == pytest.approx(direct_logprob(lm.model, "\n", "some text here"), rel=1e-4, abs=1e-3)
    out = lm.generate_until([Instance("generate_until", {}, ("abc", {"until": ["\n"], "max_gen_toks": 5}), 0)])
    assert isinstance(out[0], str) and len(out[0].encode("utf-8", "replace")) <= 5 * 3


def test_simple_evaluate_runs_a_local_task(byte_model, tmp_path):
    docs = [{"question": "Capital of France?", "choices": [" Paris", " Rome"], "label": 0},
            {"question": "2 + 2 =", "choices": [" 4", " 5", " 22"], "label": 0},
            {"question": "Colour of the sky:", "choices": [" blue", " green"], "label": 0}]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "task.yaml").write_text(TASK.format(data=tmp_path / "data.jsonl"))
    lm = PuzzleMoELM(str(byte_model))
    res = lm_eval.simple_evaluate(model=lm, tasks=["tiny_local_choice"],
                                  task_manager=TaskManager(include_path=str(tmp_path)), log_samples=False)
    acc = res["results"]["tiny_local_choice"]["acc,none"]
    # the same accuracy from the adapter's own scores: argmax over choices of log P(choice | question)
    expected = np.mean([int(np.argmax([direct_logprob(lm.model, d["question"], c) for c in d["choices"]]) == d["label"])
                        for d in docs])
    assert acc == pytest.approx(expected)


def test_adapter_refuses_an_impl_that_cannot_run(byte_model):
    from kernels import ImplError
    with pytest.raises(ImplError, match="impl must be one of"):
        PuzzleMoELM(pretrained=str(byte_model), impl="cuda")
    with pytest.raises(ImplError, match="backend is cpu"):
        PuzzleMoELM(pretrained=str(byte_model), impl="mosaic")
