"""``--exemplars published`` against a loop written from the published train scripts' description:

    im_k    = RandomHorizontalFlip, RandomVerticalFlip of the resized query batch (one draw each per batch)
    im_negs = GaussianBlur(11, σ ~ U[0.3, 1.5]) then the two flips, on the resized clean image
              repeated n_neg times (torchvision on a batch tensor: one σ and one flip pair per batch)
    rain    = crop rainy - crop clean, for the current batch (BRN, IDT) or appended to an archive of
              the last 64 // batch_size batches (RCDNet, DGUNet, DRSformer)
    index   = argmax over the pool of sum |rain_b - pool_j|;  negative 0 = clamp(crop clean + pool[index], 0, 1)
"""
import pytest
import torch
import torchvision.transforms.functional as TF

from helpers import make_trainer
from utils.train.exemplars import RainArchive, build_negatives_published


def _batch(b=3, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    clean = 0.2 + 0.5 * torch.rand(b, 3, size, size, generator=g)
    rain = (clean + 0.4 * (torch.rand(b, 3, size, size, generator=g) > 0.8)).clamp(0, 1)
    query_clean = 0.2 + 0.5 * torch.rand(b, 3, size, size, generator=g)
    query = (query_clean + 0.3 * (torch.rand(b, 3, size, size, generator=g) > 0.9)).clamp(0, 1)
    return rain, clean, query, query_clean


def _reference(rain, clean, query, query_clean, pool_batches, n_neg, draws):
    """The loop: draws = (h_pos, v_pos, sigma, h_neg, v_neg) as the generator gives them."""
    h_pos, v_pos, sigma, h_neg, v_neg = draws
    b = query.shape[0]
    positive = []
    for i in range(b):
        k = query[i]
        if h_pos < 0.5:
            k = TF.hflip(k)
        if v_pos < 0.5:
            k = TF.vflip(k)
        positive.append(k)
    pool = torch.cat(pool_batches)
    negatives = []
    for i in range(b):
        layer = rain[i] - clean[i]
        dists = [float((layer - pool[j]).abs().sum()) for j in range(pool.shape[0])]
        best = max(range(len(dists)), key=lambda j: (dists[j], -j))  # the first of equal maxima, as argmax
        row = [(clean[i] + pool[best]).clamp(0, 1)]
        for _ in range(n_neg):
            neg = TF.gaussian_blur(query_clean[i], kernel_size=11, sigma=sigma)
            if h_neg < 0.5:
                neg = TF.hflip(neg)
            if v_neg < 0.5:
                neg = TF.vflip(neg)
            row.append(neg)
        negatives.append(torch.stack(row))
    return torch.stack(positive), torch.stack(negatives)


def _draws(seed):
    g = torch.Generator().manual_seed(seed)
    h_pos, v_pos = torch.rand(2, generator=g).tolist()
    sigma = torch.empty(1).uniform_(0.3, 1.5, generator=g).item()
    h_neg, v_neg = torch.rand(2, generator=g).tolist()
    return h_pos, v_pos, sigma, h_neg, v_neg


@pytest.mark.parametrize("seed", range(6))
def test_in_batch_pool_matches_the_published_loop(seed):
    rain, clean, query, query_clean = _batch(seed=seed)
    positive, negatives = build_negatives_published(rain, clean, query, query_clean, RainArchive(1), 2,
                                                    torch.Generator().manual_seed(seed))
    ref_pos, ref_neg = _reference(rain, clean, query, query_clean, [rain - clean], 2, _draws(seed))
    torch.testing.assert_close(positive, ref_pos)
    torch.testing.assert_close(negatives, ref_neg, atol=1e-6, rtol=0)


def test_the_seeds_cover_both_flip_outcomes_and_the_sigma_range():
    """So that the loop comparison above sees flipped and unflipped batches (else it proves little)."""
    draws = [_draws(s) for s in range(6)]
    for k in (0, 1, 3, 4):
        assert {d[k] < 0.5 for d in draws} == {True, False}
    assert max(d[2] for d in draws) - min(d[2] for d in draws) > 0.3


def test_archive_pool_keeps_the_last_batches_with_the_current_one():
    archive = RainArchive(2)  # 64 // batch_size batches, here 2
    batches = [_batch(seed=s) for s in range(3)]
    for step, (rain, clean, query, query_clean) in enumerate(batches):
        g = torch.Generator().manual_seed(10 + step)
        positive, negatives = build_negatives_published(rain, clean, query, query_clean, archive, 1, g)
        pool = [r - c for r, c, _, _ in batches[max(0, step - 1):step + 1]]
        ref_pos, ref_neg = _reference(rain, clean, query, query_clean, pool, 1, _draws(10 + step))
        torch.testing.assert_close(negatives, ref_neg, atol=1e-6, rtol=0)
        torch.testing.assert_close(positive, ref_pos)


def test_one_sigma_and_one_flip_pair_for_the_whole_batch():
    _, clean, query, query_clean = _batch(b=4)
    _, negatives = build_negatives_published(clean, clean, query, query_clean, RainArchive(1), 3,
                                             torch.Generator().manual_seed(1))
    first = negatives[0, 1]
    for j in range(1, 4):  # the detail negatives of one query are identical: one σ, one flip pair
        assert torch.equal(negatives[0, j], first)


@pytest.mark.parametrize("model", ["BRN", "IDT", "RCDNet"])
def test_the_trainer_builds_the_chosen_exemplars_with_the_recipe_pool(tmp_path, tiny_demo, model):
    """One CoIC step each way: the archive receives the crop's rain layer (published) or the resized
    query's (query), and holds the current batch only for BRN and IDT under published."""
    import os

    from datasets import TrainItem

    data = os.path.join(tiny_demo, "heavy", "train")
    for mode in ("published", "query"):
        trainer = make_trainer(tmp_path / mode, data, model, ["--exemplars", mode], stage1_iters=0)
        batch = TrainItem(*next(iter(trainer._loader())))
        trainer.train_step(batch)
        layer = batch.rain - batch.clean if mode == "published" else batch.query - batch.query_clean
        torch.testing.assert_close(trainer.archive.layers[-1], layer)
        in_batch = mode == "published" and model in ("BRN", "IDT")
        expected = 1 if in_batch else RainArchive.for_batch_size(trainer.args.batch_size).capacity
        assert trainer.archive.capacity == expected
