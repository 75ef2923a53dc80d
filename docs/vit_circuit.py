"""Draw the README's transformer circuit: the zoo's tinyvit, with the demo's probe images and settings.

Usage: python docs/vit_circuit.py [CATEGORY]   (writes docs/demo_circuit_vit_<category>.png)
"""

from __future__ import annotations

import sys
from pathlib import Path

import connectome as cn
from connectome import analysis as an
from connectome import viz, zoo
from connectome.demo import MASS, PROBE_SEED


def main(category: str = "ring") -> Path:
    model = zoo.load_model("tinyvit")
    data = zoo.shapes(24, seed=PROBE_SEED)
    g = cn.extract.attribution_by_category(model, data, categories=[category], batch_size=64, progress=False,
                                           device="cpu", name="zoo:tinyvit", labels=list(zoo.SHAPE_CLASSES))[category]
    circ = an.circuit(an.annotate(g, partition=an.communities(g, seed=0)), mass=MASS)
    fig = viz.plot_circuit(circ, title=f"Circuit of {category} in tinyvit ({MASS:.0%} of flow per layer)")
    path = Path(__file__).parent / f"demo_circuit_vit_{category}.png"
    fig.savefig(path, dpi=110)
    print(f"{path}: {circ.num_nodes} units of {g.num_nodes}; rules {g.meta['rules']}; "
          f"completeness {g.meta['completeness_relative']:.1e}")
    return path


if __name__ == "__main__":
    main(*sys.argv[1:2])
