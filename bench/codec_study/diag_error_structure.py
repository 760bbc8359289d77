"""Error structure of codecs on the calibration keys (lee windows 8..9): query-energy-weighted squared error,
the share of it that is a per-(group, pair) bias (the group's mean error), and the share along the key's own
radius. Ad hoc check for README "why polar modes do not lower ppl"; prints one line per codec.

  .venv/bin/python bench/codec_study/diag_error_structure.py cart-w4-aH,hyb4-w4-qw-aH,prec4-w4-qw-aH
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import codec_study as cs  # noqa: E402


def main() -> None:
    torch.set_num_threads(1)
    model, tok = cs.data.load_model()
    calib = cs.calibrate(model, tok, 2)
    G, P = cs.G, 32
    for name in sys.argv[1].split(","):
        c = cs.Codec(name, 2 * P, 1e5, calib)
        tot = bias = rad = 0.0
        for layer, k in enumerate(calib["k"]):
            kh = c.quantize(k, layer, 0)
            B, H, T, D = k.shape
            e = calib["qe"][layer]  # [H, P, 2]
            x, y = k[..., :P], k[..., P:]
            dx, dy = kh[..., :P] - x, kh[..., P:] - y
            wx, wy = e[None, :, None, :, 0], e[None, :, None, :, 1]
            tot += (wx * dx ** 2 + wy * dy ** 2).sum().item()
            gx = dx.view(B, H, T // G, G, P).mean(3, keepdim=True)
            gy = dy.view(B, H, T // G, G, P).mean(3, keepdim=True)
            bias += ((wx[:, :, None] * gx ** 2 + wy[:, :, None] * gy ** 2) * G).sum().item()
            r = torch.hypot(x, y).clamp_min(1e-6)
            rad += (((wx + wy) / 2) * ((dx * x + dy * y) / r) ** 2).sum().item()
        print(f"{name:20s} q-weighted SSE {tot:.4g}  bias share {bias / tot:.3f}  radial share {rad / tot:.3f}",
              flush=True)


if __name__ == "__main__":
    main()
