"""Neighbour captioners: nearest copies the top caption, consensus picks the hand-computed medoid."""

import numpy as np
import pytest

from medcap.config import GeneratorConfig
from medcap.generators import get_generator
from medcap.models.similarity import pick_consensus, rouge1_matrix
from medcap.records import Neighbour, NeighbourList


def nl(qid, captions):
    return NeighbourList(qid, tuple(Neighbour(f"n{i}", 1.0 - i / 10, c) for i, c in enumerate(captions)))


def test_nearest_takes_first_captioned_neighbour():
    out = get_generator("nearest")(GeneratorConfig("nn", "nearest"), [nl("q", [None, "ct of the chest", "other"])])
    assert [(c.id, c.caption, c.generator, c.extra["source"]) for c in out] == [("q", "ct of the chest", "nn", "n1")]


def test_rouge1_matrix_matches_hand_computed_values():
    sim = rouge1_matrix(["a b c d", "a b x y", "a b c d"])
    # "a b c d" vs "a b x y": 2 common unigrams, P = R = 2/4 -> F1 = 0.5
    assert sim[0, 1] == pytest.approx(0.5) and sim[0, 2] == pytest.approx(1.0)


def test_consensus_picks_caption_closest_to_the_others():
    captions = [
        "mri of the brain shows a mass",  # nearest, but an outlier
        "ct of the abdomen shows a small lesion in the liver",
        "ct of the abdomen shows a lesion in the liver",
        "ct of the abdomen shows a large lesion",
    ]
    sim = rouge1_matrix(captions)
    np.fill_diagonal(sim, 0)
    expected = int(np.argmax(sim.sum(1)))
    assert expected == 2  # the medoid by hand: shares most words with both other CT captions
    out = get_generator("consensus")(GeneratorConfig("cons", "consensus"), [nl("q", captions)])
    assert out[0].caption == captions[2] and out[0].extra["source"] == "n2"


def test_consensus_k_limits_the_pool_and_two_captions_keep_nearest():
    assert pick_consensus(["x", "y"], rouge1_matrix) == 0
    captions = ["a", "b c", "b c d", "b c e"]
    out = get_generator("consensus")(GeneratorConfig("c", "consensus", k=2), [nl("q", captions)])
    assert out[0].caption == "a"


def test_unknown_kind_and_uncaptioned_neighbours_fail_clearly():
    with pytest.raises(ValueError, match="unknown generator kind 'llava'"):
        get_generator("llava")
    with pytest.raises(ValueError, match="image q: no neighbour with a caption"):
        get_generator("nearest")(GeneratorConfig(), [nl("q", [None])])
