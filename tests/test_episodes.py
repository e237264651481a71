
import numpy as np
import pytest
from edgemeta.runtime import DataError
from hypothesis import given, settings
from hypothesis import strategies as st

from edgemeta.data import EpisodeSampler


@settings(max_examples=40, deadline=None)
@given(way=st.integers(1, 10), shot=st.integers(1, 5), query=st.integers(0, 5), seed=st.integers(0, 2**31),
       index=st.integers(0, 10**6), ragged=st.booleans())
def test_episode_invariants(way, shot, query, seed, index, ragged):
    rng = np.random.default_rng(0)
    sizes = rng.integers(10, 14, 12) if ragged else np.full(12, 10)
    labels = np.repeat(np.arange(12), sizes)
    rng.shuffle(labels)
    ep = EpisodeSampler(labels, way, shot, query, seed).episode(index)
    assert len(set(ep.classes.tolist())) == way
    assert ep.support.shape == (way * shot,) and ep.query.shape == (way * query,)
    assert not set(ep.support.tolist()) & set(ep.query.tolist())
    assert len(set(ep.support.tolist())) == way * shot
    assert ep.support_labels.tolist() == np.repeat(np.arange(way), shot).tolist()
    assert ep.query_labels.tolist() == np.repeat(np.arange(way), query).tolist()
    # every image carries the class its episode label says
    np.testing.assert_array_equal(labels[ep.support], ep.classes[ep.support_labels])
    np.testing.assert_array_equal(labels[ep.query], ep.classes[ep.query_labels])


def test_same_seed_same_episodes_other_seed_other_episodes(omniglot):
    a = EpisodeSampler(omniglot.labels, 5, 1, 15, seed=7).episodes(20)
    b = EpisodeSampler(omniglot.labels, 5, 1, 15, seed=7).episodes(20)
    c = EpisodeSampler(omniglot.labels, 5, 1, 15, seed=8).episodes(20)
    assert all(np.array_equal(x.support, y.support) and np.array_equal(x.query, y.query) for x, y in zip(a, b))
    assert not all(np.array_equal(x.support, y.support) for x, y in zip(a, c))
    # random access: episode i does not depend on what was drawn before
    s = EpisodeSampler(omniglot.labels, 5, 1, 15, seed=7)
    assert np.array_equal(s.episode(13).query, a[13].query)


def test_equal_size_classes_take_the_vectorised_draw(omniglot):
    """With every class the same size one vectorised draw (a class × image table) serves all classes;
    one image fewer in one class takes the per-class path. Both draw valid episodes. (Behaviour, not
    timing: which path runs is what the speed comes from — benchmarks measure the speed.)"""
    keep = np.ones(len(omniglot.labels), bool)
    keep[np.flatnonzero(omniglot.labels == 0)[0]] = False
    vectorised = EpisodeSampler(omniglot.labels, 20, 5, 10, seed=0)
    per_class = EpisodeSampler(omniglot.labels[keep], 20, 5, 10, seed=0)
    assert vectorised._table is not None and per_class._table is None
    for sampler, labels in ((vectorised, omniglot.labels), (per_class, omniglot.labels[keep])):
        ep = sampler.episode(3)
        picked = np.concatenate([ep.support, ep.query])
        assert len(set(picked)) == len(picked) == 20 * 15                      # no image twice
        assert set(labels[ep.support]) == set(ep.classes) == set(labels[ep.query])


def test_more_shots_than_images_names_the_class_and_the_fix(omniglot):
    with pytest.raises(DataError, match=r"has 20 images but an episode needs 15 shots \+ 15 queries.*lower --shot"):
        EpisodeSampler(omniglot.labels, 5, 15, 15, class_names=omniglot.classes)


def test_more_ways_than_classes_is_refused():
    with pytest.raises(DataError, match="need 5 classes"):
        EpisodeSampler(np.repeat(np.arange(3), 10), 5, 1, 1)
