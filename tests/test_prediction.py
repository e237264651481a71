"""What predict answers, checked against a direct computation on the torch-free tiny bundle (also
run in the device environment: NumPy 1.x under the JetPack constraints)."""
import numpy as np
import pytest
from edgemeta.runtime import FewShotClassifier


@pytest.mark.parametrize("head", [{"kind": "prototype", "metric": "cosine", "scale": 12.0},
                                  {"kind": "prototype", "metric": "euclidean", "scale": 0.5},
                                  {"kind": "prototype", "metric": "cosine", "scale": 0.0},
                                  {"kind": "logistic", "steps": 5}])
def test_predict_gives_the_softmax_of_the_heads_logits_at_any_top_k_and_batch(device_bundle, head):
    """predict's top-1 path never normalises the softmax (the top class is the largest logit's, its
    probability 1 / Σ exp(logit − max)): it must agree with the softmax computed in full and with top_k > 1."""
    from edgemeta.runtime import heads
    from edgemeta.runtime.open_set import embedding_distance
    clf = FewShotClassifier.load(device_bundle, head=head)
    rng = np.random.default_rng(3)
    for c in range(4):
        clf.enroll(f"c{c}", rng.integers(0, 256, (3, 16, 16, 1), dtype=np.uint8))
    state, metric = clf._state, clf.head.rejection_metric(clf.bundle.l2_normalized)
    protos = state.fitted["prototypes"]
    for batch in (1, 5):
        pixels = rng.integers(0, 256, (batch, 16, 16, 1), dtype=np.uint8)
        q = clf.embed(pixels)
        logits = (heads.prototype_logits(q, protos, metric, state.head.scale) if state.head.kind == "prototype"
                  else heads.score(state.head, state.fitted, q))
        probs = heads.softmax(logits.astype(np.float64))
        top1, top3 = clf.predict(pixels), clf.predict(pixels, top_k=3)
        order = np.argsort(-probs, axis=1)
        assert top1.labels == top3.labels == [f"c{i}" for i in order[:, 0]]
        np.testing.assert_allclose(top1.probabilities[:, 0], probs.max(1), rtol=1e-5)
        np.testing.assert_allclose(top3.probabilities, np.take_along_axis(probs, order[:, :3], 1), rtol=1e-5)
        assert [[lab for lab, _ in row] for row in top3.top_k] == [[f"c{i}" for i in o[:3]] for o in order]
        expected = embedding_distance(q, protos, metric).min(1)
        np.testing.assert_allclose(top1.distances, expected, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(top3.distances, expected, rtol=1e-4, atol=1e-5)


def test_the_auto_rule_is_made_once_per_state_while_requests_wait_and_in_linear_time(device_bundle, monkeypatch):
    """unknown=auto on one-shot classes was O(C²·D) and recomputed by every concurrent request (8
    requests after one enroll took 61–63 s each). The rule is made once per enrolled state, the
    others wait for it; without a prior it compares a sample of classes to all."""
    import threading
    import time

    from edgemeta.runtime import classifier as classifier_module
    from edgemeta.runtime.open_set import SUPPORT_SAMPLE, support_set_threshold
    clf = FewShotClassifier.load(device_bundle)
    rng = np.random.default_rng(0)
    clf.enroll_embeddings({f"c{i}": rng.normal(size=(1, clf.bundle.embedding_dim)).astype(np.float32) for i in range(50)})
    made = []
    real = classifier_module.rejection_rule

    def slow_rule(*args):
        made.append(1)
        time.sleep(0.3)
        return real(*args)
    monkeypatch.setattr(classifier_module, "rejection_rule", slow_rule)
    query = rng.normal(size=(4, clf.bundle.embedding_dim)).astype(np.float32)
    out = []
    threads = [threading.Thread(target=lambda: out.append(clf.classify_embeddings(query, reject="auto").labels)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(made) == 1 and len(out) == 8 and all(o == out[0] for o in out)
    # time linear in the classes: 20,000 one-shot classes compare SUPPORT_SAMPLE of them to all
    many = [rng.normal(size=(1, 16)).astype(np.float32) for _ in range(20_000)]
    t0 = time.perf_counter()
    assert support_set_threshold(many, "euclidean") > 0
    assert time.perf_counter() - t0 < 20 and SUPPORT_SAMPLE < 20_000
