"""fastvit-gpu-check's parity checks: every public op, forward and backward to every input, at ViT-B/16
and T2T-ViT-14 shapes (``GPU_SHAPES``, batch 32: 32 x 197 rows reach the split-K paths) or at sizes the
Triton interpreter runs in seconds (``PLAN_SHAPES``). Each is a ``smoke.SmokeCheck``, judged by the
numerics rule in bf16 and fp16 against the float64 reference (``smoke.run_checks``)."""

from __future__ import annotations

PARITY_BATCH = 32

GPU_SHAPES = {
    "vit": {"B": PARITY_BATCH, "N": 197, "C": 768, "heads": 12, "hidden": 3072, "img": 224, "patch": 16},
    "t2t": {"B": PARITY_BATCH, "N": 197, "C": 384, "heads": 6, "hidden": 1152, "img": 224,
            "performer": ((3136, 147), (784, 576)), "split2": (64, 56)},
}
PLAN_SHAPES = {  # the same checks at sizes the Triton interpreter runs in seconds
    "vit": {"B": 2, "N": 7, "C": 64, "heads": 2, "hidden": 128, "img": 16, "patch": 8},
    "t2t": {"B": 2, "N": 5, "C": 128, "heads": 2, "hidden": 192, "img": 16,
            "performer": ((16, 147), (9, 72)), "split2": (8, 8)},
}


def parity_checks(shapes: dict) -> list:
    """One SmokeCheck per op and shape: forward and backward to every input, at ViT-B/16 and T2T-ViT-14
    (``GPU_SHAPES``) or tiny (``PLAN_SHAPES``) sizes."""
    import torch

    from benchmarks.smoke import SmokeCheck, draw
    from fastvit import ops

    vit, t2t = shapes["vit"], shapes["t2t"]
    checks = []

    def add(family, name, shape, build):
        checks.append(SmokeCheck(family, name, shape, build))

    def mlp(s, label, activation="gelu"):
        B, N, C, H = s["B"], s["N"], s["C"], s["hidden"]

        def build(dtype, device):
            x = draw(B, N, C, dtype=dtype, device=device)
            ln = [draw(C, dtype=dtype, device=device), draw(C, dtype=dtype, device=device)]
            w1, b1 = draw(H, C, dtype=dtype, device=device, scale=C**-0.5), draw(H, dtype=dtype, device=device)
            w2, b2 = draw(C, H, dtype=dtype, device=device, scale=H**-0.5), draw(C, dtype=dtype, device=device)
            return ((lambda: ops.layernorm_mlp(x, *ln, w1, b1, w2, b2, eps=1e-6, residual=x, activation=activation)),
                    [x, *ln, w1, b1, w2, b2])

        name = f"layernorm_mlp {label}" + ("" if activation == "gelu" else f" {activation}")
        add("mlp", name, {"B": B, "N": N, "C": C, "hidden": H}, build)

    def layer_norm(s, label):
        B, N, C = s["B"], s["N"], s["C"]

        def build(dtype, device):
            x = draw(B, N, C, dtype=dtype, device=device, scale=2.0)
            w, b = draw(C, dtype=dtype, device=device), draw(C, dtype=dtype, device=device)
            return (lambda: ops.layer_norm(x, w, b, 1e-6)), [x, w, b]

        add("mlp", f"layer_norm {label}", {"B": B, "N": N, "C": C}, build)

    def attention(s, label, masked=False):
        B, N, H, D = s["B"], s["N"], s["heads"], s["C"] // s["heads"]

        def build(dtype, device):
            q, k, v = (draw(B, H, N, D, dtype=dtype, device=device) for _ in range(3))
            keep = torch.ones(B, 1, 1, N, dtype=torch.bool, device=device)
            keep[B // 2:, ..., max(1, N - N // 4):] = False  # key padding on half the batch
            return (lambda: ops.attention(q, k, v, mask=keep if masked else None)), [q, k, v]

        add("attention", f"attention {label}" + (" key-padding mask" if masked else ""),
            {"B": B, "H": H, "N": N, "D": D}, build)

    def qkvpacked(s, label, heads=None, head_dim=None):
        B, N = s["B"], s["N"]
        H, D = heads or s["heads"], head_dim or s["C"] // s["heads"]

        def build(dtype, device):
            qkv = draw(B, N, 3 * H * D, dtype=dtype, device=device)
            return (lambda: ops.attention_qkvpacked(qkv, H)), [qkv]

        add("attention", f"attention_qkvpacked {label}", {"B": B, "N": N, "H": H, "D": D}, build)

    def patch_embed(s, label, hwc):
        B, D, p, img = s["B"], s["C"], s["patch"], s["img"]
        L = (img // p) ** 2 + 1

        def build(dtype, device):
            x = draw(B, 3, img, img, dtype=dtype, device=device)
            cls, pos = draw(D, dtype=dtype, device=device), draw(L, D, dtype=dtype, device=device)
            b = draw(D, dtype=dtype, device=device)
            if not hwc:
                w = draw(D, 3, p, p, dtype=dtype, device=device, scale=(3 * p * p) ** -0.5)
                return (lambda: ops.patch_embed(x, w, b, p, pos_embed=pos, cls_token=cls)), [x, w, b, cls, pos]
            F = 3 * p * p
            w = draw(D, F, dtype=dtype, device=device, scale=F**-0.5)
            n = [draw(F, dtype=dtype, device=device), draw(F, dtype=dtype, device=device),
                 draw(D, dtype=dtype, device=device), draw(D, dtype=dtype, device=device)]
            return (lambda: ops.patch_embed(x, w, b, p, pos_embed=pos, cls_token=cls, patch_order="hwc", pre_norm=True,
                                            pre_norm_weight=n[0], pre_norm_bias=n[1], post_norm=True,
                                            post_norm_weight=n[2], post_norm_bias=n[3])), [x, w, b, cls, pos, *n]

        add("embed", f"patch_embed {'hwc + norms' if hwc else 'conv'} {label}",
            {"B": B, "img": img, "patch": p, "D": D}, build)

    def soft_split(s, label):
        B, img = s["B"], s["img"]

        def build(dtype, device):
            x = draw(B, 3, img, img, dtype=dtype, device=device)
            return (lambda: ops.soft_split(x, 7, 4, 2)), [x]

        add("embed", f"soft_split k7s4p2 {label}", {"B": B, "C": 3, "H": img, "W": img}, build)

    def soft_split_ln(s, label):
        B, (C, Hs) = s["B"], s["split2"]
        F = C * 9

        def build(dtype, device):
            x = draw(B, C, Hs, Hs, dtype=dtype, device=device)
            w, b = draw(F, dtype=dtype, device=device), draw(F, dtype=dtype, device=device)
            return (lambda: ops.soft_split_layer_norm(x, 3, 2, 1, w, b)), [x, w, b]

        add("embed", f"soft_split_layer_norm k3s2p1 {label}", {"B": B, "C": C, "H": Hs, "W": Hs}, build)

    def performer(s, label, T, dim):
        B, emb, m = s["B"], 64, 32

        def build(dtype, device):
            x = draw(B, T, dim, dtype=dtype, device=device)
            kqv_w, kqv_b = draw(3 * emb, dim, dtype=dtype, device=device, scale=dim**-0.5), draw(3 * emb, dtype=dtype, device=device)
            w = draw(m, emb, dtype=dtype, device=device, grad=False)  # T2T-ViT keeps it fixed
            pw, pb = draw(emb, emb, dtype=dtype, device=device, scale=emb**-0.5), draw(emb, dtype=dtype, device=device)
            return (lambda: ops.performer_attention(x, kqv_w, kqv_b, w, pw, pb)), [x, kqv_w, kqv_b, pw, pb]

        add("performer", f"performer_attention T{T} dim{dim} {label}", {"B": B, "T": T, "dim": dim, "emb": emb}, build)

    layer_norm(vit, "ViT-B/16")
    mlp(vit, "ViT-B/16")
    mlp(t2t, "T2T-ViT-14")
    attention(vit, "ViT-B/16")
    attention(vit, "ViT-B/16", masked=True)
    attention(t2t, "T2T-ViT-14")
    qkvpacked(vit, "ViT-B/16")
    qkvpacked(vit, "SigLIP-so400m heads", heads=16, head_dim=72)  # a head dim padded inside the kernel
    mlp(vit, "ViT-B/16", activation="gelu_tanh")  # SigLIP
    mlp(vit, "ViT-B/16", activation="quick_gelu")  # CLIP
    patch_embed(vit, "ViT-B/16", hwc=False)
    patch_embed(vit, "ViT-B/16", hwc=True)
    soft_split(t2t, "T2T-ViT-14")
    soft_split_ln(t2t, "T2T-ViT-14")
    for T, dim in t2t["performer"]:
        performer(t2t, "T2T-ViT-14", T, dim)
    return checks
