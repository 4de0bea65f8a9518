import pytest
import torch

from dynlens.data import ModularArithmetic, modular_table


@pytest.mark.parametrize(
    ("op", "fn"),
    [
        ("+", lambda a, b, p: (a + b) % p),
        ("-", lambda a, b, p: (a - b) % p),
        ("*", lambda a, b, p: (a * b) % p),
    ],
)
def test_table_against_brute_force(op, fn):
    p = 7
    pairs, labels = modular_table(p, op)
    assert len(pairs) == p * p
    expected = {(a, b): fn(a, b, p) for a in range(p) for b in range(p)}
    got = {(int(a), int(b)): int(y) for (a, b), y in zip(pairs, labels, strict=True)}
    assert got == expected


def test_division_multiplies_back():
    p = 11
    pairs, labels = modular_table(p, "/")
    assert len(pairs) == p * (p - 1)  # b = 0 excluded
    assert torch.all(pairs[:, 1] != 0)
    # (a / b) * b == a mod p
    assert torch.equal((labels * pairs[:, 1]) % p, pairs[:, 0])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"p": 1}, "modulus"),
        ({"p": 12, "op": "/"}, "prime"),
        ({"op": "%"}, "op"),
        ({"train_fraction": 0.0}, "train_fraction"),
        ({"train_fraction": 1.0}, "train_fraction"),
        ({"p": 2, "train_fraction": 0.1}, "empty split"),
        ({"encoding": "binary"}, "encoding"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ModularArithmetic(**kwargs)


def test_paper_split_sizes_and_shapes():
    dm = ModularArithmetic(p=113, train_fraction=0.4)
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set)) == (5107, 7662)
    x, y = dm.train_set.tensors
    assert x.shape == (5107, 226) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert dm.input_dim == 226 and dm.num_classes == 113


def _pairs(dataset, p):
    x, y = dataset.tensors
    a, b = x[:, :p].argmax(1), x[:, p:].argmax(1)
    return {(int(i), int(j)) for i, j in zip(a, b, strict=True)}, (a, b, y)


def test_onehot_split_is_disjoint_complete_and_labelled_right():
    p = 13
    dm = ModularArithmetic(p=p, op="-", train_fraction=0.3, seed=3)
    dm.setup()
    train, (a, b, y) = _pairs(dm.train_set, p)
    val, _ = _pairs(dm.val_set, p)
    assert not train & val and len(train | val) == p * p
    assert torch.equal(y, (a - b) % p)
    assert torch.all(dm.train_set.tensors[0].sum(1) == 2)  # exactly two hot entries


def test_split_is_seeded():
    def split(seed):
        dm = ModularArithmetic(p=11, seed=seed, encoding="tokens")
        dm.setup()
        return dm.train_set.tensors[0]

    assert torch.equal(split(0), split(0))
    assert not torch.equal(split(0), split(1))


def test_tokens_encoding():
    dm = ModularArithmetic(p=11, op="*", encoding="tokens")
    dm.setup()
    x, y = dm.train_set.tensors
    assert x.shape[1] == 2 and x.dtype == torch.int64 and dm.input_dim == 2
    assert torch.equal(y, (x[:, 0] * x[:, 1]) % 11)


def test_full_batch_by_default_and_not_shuffled():
    dm = ModularArithmetic(p=11)
    batches = list(dm.train_dataloader())
    assert len(batches) == 1
    x, y = batches[0]
    assert torch.equal(x, dm.train_set.tensors[0]) and torch.equal(y, dm.train_set.tensors[1])
    (_, vy), *rest = list(dm.val_dataloader())
    assert not rest and torch.equal(vy, dm.val_set.tensors[1])


def test_minibatches_cover_the_train_set_in_a_seeded_order():
    dm = ModularArithmetic(p=11, batch_size=10, val_batch_size=7, seed=5)
    batches = list(dm.train_dataloader())
    assert [len(y) for _, y in batches][:-1] == [10] * (len(batches) - 1)
    seen = torch.cat([x for x, _ in batches])
    assert len(seen) == len(dm.train_set)
    assert not torch.equal(seen, dm.train_set.tensors[0])  # shuffled
    again = torch.cat(
        [x for x, _ in ModularArithmetic(p=11, batch_size=10, seed=5).train_dataloader()]
    )
    assert torch.equal(seen, again)
    assert max(len(y) for _, y in dm.val_dataloader()) == 7
