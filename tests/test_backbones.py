import pytest
import torch
from edgemeta.runtime import ConfigError, InputSpec

from edgemeta.backbones import Embedder, create_backbone, deployment_args, list_backbones


@pytest.mark.parametrize("name,size,colour,dim", [
    ("conv4", 28, "L", 64), ("conv4", 84, "RGB", 1600),
    ("resnet12", 32, "RGB", 640), ("edgenet", 28, "L", 128), ("edgenet", 64, "RGB", 128),
])
def test_backbones_embed_images_to_vectors(name, size, colour, dim):
    spec = InputSpec(size, size, colour)
    embedder = Embedder(name, spec)
    x = torch.rand(3, spec.channels, size, size) * 255
    z = embedder(x)
    assert z.shape == (3, dim) and embedder.embed_dim == dim
    assert torch.isfinite(z).all()


def test_registry_lists_the_backbones_and_refuses_unknown_names():
    assert list_backbones() == ["conv4", "edgenet", "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "resnet12"]
    with pytest.raises(ConfigError, match="unknown backbone 'vgg'.*conv4"):
        create_backbone("vgg")
    with pytest.raises(ConfigError, match="bad arguments"):
        create_backbone("conv4", nonsense=3)


def test_edge_backbone_is_an_order_of_magnitude_smaller_than_resnet12():
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    edge, resnet = count(create_backbone("edgenet")), count(create_backbone("resnet12"))
    assert edge < 300_000 and resnet > 10_000_000


def test_input_normalisation_is_part_of_the_model():
    spec = InputSpec(28, 28, "L", mean=(0.9,), std=(0.2,))
    e = Embedder("conv4", spec)
    x = torch.full((1, 1, 28, 28), 255.0)
    assert torch.allclose(e.normalize(x), torch.full_like(x, (1.0 - 0.9) / 0.2), atol=1e-6)


@pytest.mark.parametrize("name,colour", [("conv4", "L"), ("resnet12", "RGB"), ("edgenet", "RGB")])
def test_channels_last_changes_the_layout_not_the_function(name, colour):
    """The training layout switch: BatchNorm sees NHWC activations (so the switch cannot silently
    stop working — with one input channel `.contiguous()` would keep NCHW strides), while
    embeddings and parameter gradients equal the NCHW ones."""
    spec = InputSpec(16, 16, colour)
    x = torch.rand(6, spec.channels, 16, 16, dtype=torch.float64) * 255
    results = {}
    for channels_last in (False, True):
        torch.manual_seed(0)
        embedder = Embedder(name, spec, {"widths": (8, 8, 8, 8)} if name == "resnet12" else {},
                            channels_last=channels_last).double()
        seen = []
        bn = next(m for m in embedder.modules() if isinstance(m, torch.nn.BatchNorm2d))
        bn.register_forward_hook(lambda m, inp, out: seen.append(inp[0].is_contiguous(memory_format=torch.channels_last)
                                                                and not inp[0].is_contiguous()))
        z = embedder(x)
        z.square().sum().backward()
        results[channels_last] = (z.detach(), [p.grad for p in embedder.parameters()])
        assert seen == [channels_last]
    torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-10, atol=1e-10)
    for a, b in zip(results[True][1], results[False][1]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("name,colour,args", [("conv4", "L", {}), ("resnet12", "RGB", {"widths": (8, 8, 8, 8)})])
def test_pooling_before_the_activation_is_the_same_network_bit_for_bit(name, colour, args):
    """pool_first (the default) and the literature's activation-then-pool order load the same
    weights and give identical embeddings and gradients, also where max-pool windows tie (a
    quantised input makes ties and exact zeros common)."""
    spec = InputSpec(16, 16, colour)
    x = torch.randint(0, 4, (6, spec.channels, 16, 16)).float() * 85
    results = {}
    for pool_first in (True, False):
        torch.manual_seed(0)
        embedder = Embedder(name, spec, {**args, "pool_first": pool_first}, channels_last=True)
        if pool_first:
            state = embedder.state_dict()
        else:
            embedder.load_state_dict(state)  # same keys: neither pooling nor activation has parameters
        z = embedder(x)
        (z * torch.linspace(-1, 1, z.shape[1])).sum().backward()
        results[pool_first] = [z.detach()] + [p.grad for p in embedder.parameters()]
    kinds = [type(m) for m in Embedder(name, spec, args).backbone.modules()]
    pools = [i for i, k in enumerate(kinds) if k is torch.nn.MaxPool2d]
    assert len(pools) == 4 and all(kinds[i + 1] in (torch.nn.ReLU, torch.nn.LeakyReLU) for i in pools)  # default
    for a, b in zip(results[True], results[False]):
        assert torch.equal(a, b)


def test_pooling_first_gives_second_order_maml_the_same_meta_gradient_to_rounding():
    from edgemeta.algorithms import MAML
    spec = InputSpec(16, 16, "L")
    g = torch.Generator().manual_seed(0)
    sx, qx = (torch.rand(2, n, 1, 16, 16, generator=g, dtype=torch.float64) * 255 for n in (5, 10))
    sy, qy = torch.arange(5), torch.arange(5).repeat(2)
    grads = {}
    for pool_first in (True, False):
        torch.manual_seed(0)
        model = MAML(Embedder("conv4", spec, {"pool_first": pool_first}, channels_last=True), 5, 1, 0.4).double()
        model.meta_step(sx, sy, qx, qy)
        grads[pool_first] = [p.grad for p in model.parameters() if p.grad is not None]
    assert len(grads[True]) == 14  # 4 × (conv, BN weight, BN bias) + head weight and bias
    for a, b in zip(grads[True], grads[False]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_export_builds_the_literature_order_wherever_the_backbone_has_the_choice():
    assert deployment_args("conv4", {"hidden": 32}) == {"hidden": 32, "pool_first": False}
    assert deployment_args("resnet12", {"pool_first": True}) == {"pool_first": False}
    assert deployment_args("edgenet", {"width": 0.5}) == {"width": 0.5}  # no max-pool, no choice
    assert deployment_args("vgg", {}) == {}  # left for create_backbone to refuse by name
