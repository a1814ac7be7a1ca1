import torch

from utils.train.exemplars import RainArchive, build_negatives, gaussian_blur, random_flips


def test_archive_capacity_and_most_different():
    archive = RainArchive.for_batch_size(12)
    assert archive.capacity == 64 // 12
    for v in range(8):
        archive.push(torch.full((2, 3, 4, 4), float(v)))
    assert len(archive.layers) == 5
    query = torch.stack([torch.full((3, 4, 4), 3.0), torch.full((3, 4, 4), 7.0)])
    got = archive.most_different(query)
    assert torch.equal(got[0], torch.full((3, 4, 4), 7.0))  # archive holds 3..7: furthest from 3 is 7
    assert torch.equal(got[1], torch.full((3, 4, 4), 3.0))


def test_negatives_built_as_described():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(24.0), torch.arange(24.0), indexing="ij")
    smooth = 0.25 + 0.2 * torch.sin(xx / 3) * torch.cos(yy / 4)
    clean = (smooth + 0.05 * torch.rand(3, 3, 24, 24)).clamp(0, 1)
    rain = torch.zeros(3, 3, 24, 24)
    rain[0, :, ::4] = 0.1
    rain[1, :, :, ::3] = 0.4
    rain[2] = 0.3
    query = (clean + rain).clamp(0, 1)
    archive = RainArchive(4)
    positive, negs = build_negatives(query, clean, archive, n_neg=4, generator=g)
    assert negs.shape == (3, 5, 3, 24, 24)
    # rain-aware negative: own clean image + the most different rain layer (L1) of the archive
    layers = query - clean
    dist = torch.cdist(layers.flatten(1), layers.flatten(1), p=1)
    expected = (clean + layers[dist.argmax(1)]).clamp(0, 1)
    torch.testing.assert_close(negs[:, 0], expected)
    # positive: the query flipped (same pixels, maybe mirrored)
    for n in range(3):
        options = [query[n], query[n].flip(-1), query[n].flip(-2), query[n].flip(-1).flip(-2)]
        assert any(torch.equal(positive[n], o) for o in options)
    # detail-aware negatives: blurred flipped copies of the clean image: no rain, less detail
    for n in range(3):
        for j in range(1, 5):
            neg = negs[n, j]
            unflipped = [neg, neg.flip(-1), neg.flip(-2), neg.flip(-1).flip(-2)]
            err = min(float((u - clean[n]).abs().mean()) for u in unflipped)
            assert 0 < err < 0.05
            assert neg.std() < clean[n].std()


def test_blur_per_sample_sigma_and_flip_probability():
    x = torch.zeros(2, 1, 15, 15)
    x[:, :, 7, 7] = 1.0
    y = gaussian_blur(x, torch.tensor([0.3, 1.5]))
    assert y[0, 0, 7, 7] > y[1, 0, 7, 7]
    torch.testing.assert_close(y.sum(dim=(1, 2, 3)), torch.ones(2))
    g = torch.Generator().manual_seed(1)
    imgs = torch.arange(16.0).view(1, 1, 4, 4).expand(400, -1, -1, -1)
    flipped = random_flips(imgs, g)
    unchanged = (flipped == imgs).flatten(1).all(1).float().mean()
    assert 0.15 < unchanged < 0.35  # P(no flip) = 1/4


def _flips(t):
    return [t, t.flip(-1), t.flip(-2), t.flip(-1).flip(-2)]


def test_blur_equals_torchvision_gaussian_blur():
    from torchvision.transforms.functional import gaussian_blur as tv_blur

    gen = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 20, 17, generator=gen)
    sigmas = torch.tensor([0.3, 0.9, 1.5])
    ours = gaussian_blur(x, sigmas)
    for n, s in enumerate(sigmas.tolist()):
        torch.testing.assert_close(ours[n], tv_blur(x[n], [11, 11], [s, s]), atol=1e-6, rtol=1e-5)


def test_detail_negatives_use_own_clean_image_and_sigma_in_published_range(monkeypatch):
    import utils.train.exemplars as contrastive

    drawn = []
    blur = contrastive.gaussian_blur
    monkeypatch.setattr(contrastive, "gaussian_blur", lambda x, sigma, *a: (drawn.append(sigma.clone()),
                                                                           blur(x, sigma, *a))[1])
    b, n_neg = 3, 5
    levels = torch.tensor([0.2, 0.5, 0.8])
    yy, xx = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    pattern = 0.1 * torch.sin(xx) * torch.cos(yy / 2)  # detail a blur visibly removes
    clean = (levels.view(b, 1, 1, 1) + pattern).expand(b, 3, 16, 16).contiguous()
    query = (clean + 0.1).clamp(0, 1)
    g = torch.Generator().manual_seed(0)
    for _ in range(40):
        _, negs = build_negatives(query, clean, RainArchive(2), n_neg, generator=g)
    for i in range(b):
        for j in range(1, 1 + n_neg):
            neg = negs[i, j]
            # a blur keeps the mean level: each negative belongs to its own sample's clean image
            assert abs(float(neg.mean()) - float(clean[i].mean())) < 0.02, (i, j)
    sigmas = torch.cat(drawn)
    assert sigmas.numel() == 40 * b * n_neg
    assert float(sigmas.min()) >= 0.3 and float(sigmas.max()) <= 1.5
    assert float(sigmas.min()) < 0.35 and float(sigmas.max()) > 1.45  # the whole range is used
    # each negative is the σ-blurred clean image, maybe flipped (σ read back from the spy)
    last = drawn[-1].view(b, n_neg)
    for i in range(b):
        for j in range(n_neg):
            expected = blur(clean[i:i + 1], last[i, j:j + 1])[0]
            assert any(torch.allclose(negs[i, 1 + j], f, atol=1e-6) for f in _flips(expected)), (i, j)


def test_rain_aware_negative_from_most_different_archived_layer_clamped():
    b = 2
    archive = RainArchive(3)
    gen = torch.Generator().manual_seed(5)
    older = [torch.rand(b, 3, 8, 8, generator=gen) * s for s in (0.1, 0.9)]  # earlier batches' layers
    for layers in older:
        archive.push(layers)
    clean = torch.full((b, 3, 8, 8), 0.5)
    rain_layer = torch.rand(b, 3, 8, 8, generator=gen) * 0.3
    query = clean + rain_layer
    _, negs = build_negatives(query, clean, archive, n_neg=1, generator=torch.Generator().manual_seed(0))
    bank = [layer for layers in older + [rain_layer] for layer in layers]  # all 6 archived layers
    for i in range(b):
        distances = [float((rain_layer[i] - layer).abs().sum()) for layer in bank]
        far = bank[max(range(len(bank)), key=distances.__getitem__)]
        expected = (clean[i] + far).clamp(0, 1)
        assert float((clean[i] + far).max()) > 1.0  # the clamp matters here
        torch.testing.assert_close(negs[i, 0], expected)
    assert len(archive.layers) == 3
