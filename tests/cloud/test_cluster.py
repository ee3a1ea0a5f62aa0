"""Phase I clustering: planted domains recovered, on synthetic embeddings and on the real corpora."""

from __future__ import annotations

import numpy as np
import pytest

from deepfusion.cloud.cluster import ClusterReport, cluster_devices
from deepfusion.shared.corpora import SplitSpec, prepare_splits, read_jsonl
from tests.cloud.federation import embedding_for


def test_planted_synthetic_domains_and_stable_ids_across_rounds():
    embeddings = {
        f"d{domain}-{i}": embedding_for(domain, 10 * domain + i) for domain in range(3) for i in range(4)
    }
    report = cluster_devices(embeddings, 3, seed=0)
    assert sorted(report.sizes.values()) == [4, 4, 4]
    for members in report.members.values():
        assert len({m.split("-")[0] for m in members}) == 1
    assert report.silhouette is not None and report.silhouette > 0.5
    # Next round: a new seed may number clusters differently; matching to last round's centroids keeps ids.
    again = cluster_devices(embeddings, 3, seed=7, previous_centroids=report.centroids)
    assert again.assignment == report.assignment
    assert ClusterReport.model_validate_json(report.model_dump_json()) == report


def test_fewer_devices_than_clusters():
    report = cluster_devices({"a": [1] * 32, "b": [-1] * 32}, 4)
    assert report.k == 2 and report.silhouette is None and report.sizes == {0: 1, 1: 1}


@pytest.mark.slow
def test_medical_and_finance_devices_are_recovered_from_their_private_text(asset_cache, corpora):
    from sklearn.metrics import adjusted_rand_score

    from deepfusion.edge.embed import data_embedding

    # Six devices per domain with uneven shares (40% ... 5%) and sub-topic skew: a realistic federation.
    directory, manifest = prepare_splits(asset_cache, SplitSpec(devices_per_domain=6, skew_alpha=0.5, seed=0))
    embeddings: dict[str, list[int]] = {}
    truth: dict[str, str] = {}
    for domain, entries in manifest.devices.items():
        for i, entry in enumerate(entries):
            texts = [d.text for d in read_jsonl(directory / entry.file)]
            name = f"{domain[:3]}-{i}"
            embeddings[name] = data_embedding(
                texts, max_texts=16, seed=i, cache_dir=asset_cache / "embeddings"
            )
            truth[name] = domain
    report = cluster_devices(embeddings, 2, seed=0)
    names = sorted(embeddings)
    ari = adjusted_rand_score([truth[n] for n in names], [report.assignment[n] for n in names])
    print(f"\nphase I on {len(names)} devices: ARI {ari:.3f}\n{report.summary()}")
    assert ari >= 0.9
    assert sorted(m for members in report.members.values() for m in members) == names
    assert report.silhouette is not None and report.silhouette > 0.2
    assert np.array(list(embeddings.values())).dtype.kind == "i"


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_identical_embeddings_make_no_empty_cluster():
    """Fewer distinct directions than K: every cluster of the report has members (a teacher to distil)."""
    parallel = {"a": [5] * 32, "b": [10] * 32, "c": [5] * 32, "d": [-5] * 32}
    for embeddings, k, made in (({"a": [5] * 32, "b": [5] * 32, "c": [5] * 32}, 2, 1), (parallel, 3, 2)):
        report = cluster_devices(embeddings, k)
        assert report.k == made and len(report.centroids) == made
        assert sorted(report.members) == list(range(made)) and all(report.members.values())
        assert set(report.assignment.values()) == set(range(made))


@pytest.mark.parametrize("seed", range(4))
def test_cluster_ids_stay_when_a_device_joins_a_federation_with_fewer_devices_than_k(seed):
    """K=3 with two devices makes two clusters; the third device's domain gets a new id, not theirs."""
    two = {f"d{domain}": embedding_for(domain, domain) for domain in range(2)}
    three = two | {"d2": embedding_for(2, 2)}
    before = cluster_devices(two, 3, seed=seed)
    grown = cluster_devices(three, 3, seed=seed + 1, previous_centroids=before.centroids)
    assert before.k == 2 and grown.k == 3
    assert {d: grown.assignment[d] for d in two} == before.assignment
    assert grown.assignment["d2"] == 2
    np.testing.assert_allclose(grown.centroids[:2], before.centroids, atol=1e-9)
    # It leaves again: the two remaining domains keep their ids 0 and 1.
    shrunk = cluster_devices(two, 3, seed=seed + 2, previous_centroids=grown.centroids)
    assert shrunk.assignment == before.assignment
