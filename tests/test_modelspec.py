"""What the command line assumes about a model is said, not silent."""

from __future__ import annotations

from connectome.modelspec import load_model_spec


def test_torchvision_without_weights_says_it_is_random(capsys, tmp_path):
    spec = load_model_spec("torchvision:resnet18")
    err = capsys.readouterr().err
    assert "random weights" in err and "--weights DEFAULT" in err
    assert spec.meta == {"weights": "random init"}
    import torch

    path = tmp_path / "w.pt"
    torch.save(spec.model.state_dict(), path)
    spec2 = load_model_spec("torchvision:resnet18", str(path))
    assert "random" not in capsys.readouterr().err
    assert spec2.meta == {"weights": str(path)}


def test_weights_graph_of_a_random_torchvision_model_says_so_in_meta(tmp_path):
    import connectome as cn
    from connectome.cli import main

    out = tmp_path / "g.npz"
    assert main(["weights", "torchvision:squeezenet1_1", "--input-shape", "3,64,64", "--out", str(out)]) == 0
    assert cn.load(out).meta["weights"] == "random init"
