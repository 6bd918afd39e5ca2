"""Effective receptive field (ERF) of a classification or segmentation network.

Used by: Bum Jun Kim, Hyeyeon Choi, Hyeonah Jang, Sang Woo Kim, "Resolution-Aware
Design of Atrous Rates for Semantic Segmentation Networks", arXiv 2307.14179;
"Understanding Gaussian Attention Bias of Vision Transformers Using Effective
Receptive Fields", arXiv 2305.04722; and the dead-pixel paper. The ERF itself is
from Luo et al., "Understanding the Effective Receptive Field in Deep
Convolutional Neural Networks", arXiv 1701.04128.

[paper, authors' code] The ERF is the gradient of one output unit with respect
to the input image: for a classification network the centre position of its
last feature map, channel-averaged; for a vision transformer the patch tokens
*after the final norm* (the GAB paper's definition, section 2), channel-averaged;
for a segmentation network the centre pixel's output. The per-image gradient is
averaged over RGB, clipped at 0, accumulated over many images and normalised to
sum 1; a 2D Gaussian is fitted to report its size.

[decision] The segmentation target by default is the decoder's features
before ``conv_seg`` (the tensor the classifier reads), resized to the input
size like the logits, channel mean at the centre pixel. The alternative, the
mean over classes of the centre pixel's logits (``target='logits'``), measures
``mean_k(W_k) . f``: the one direction that softmax cross-entropy never trains
(adding the same value to every logit changes no prediction), so it depends on
the classifier's initialisation rather than on what training learnt.

Batched computation: in eval mode the images of a batch are independent, so one
backward of the sum of the per-image target units gives every per-image
gradient. It equals the per-image loop (tested). In train mode BatchNorm couples
the samples, so every function here runs the model in eval mode (and restores
its mode afterwards). Several output positions are batched the same way: a
batch element is one (image, position) pair.

[decision] Details the sources leave open: the output unit at fractional
position ``(fy, fx)`` of an ``h x w`` map is ``(floor(fy*h), floor(fx*w))``
(the centre is ``(h//2, w//2)`` as in the authors' code); the gradient is taken
with respect to the tensor given to the network (i.e. after mean/std
normalisation); the Gaussian is axis-aligned with a free centre, fitted by
least squares (Levenberg-Marquardt) to the normalised map; the "centred
square" of the 50 % / 90 % mass sides is centred on the pixel nearest to the
ERF's centre of mass and has odd side ``2k+1`` (clipped at the image border).

Only torch is needed; ``timm`` is imported only when a model is given by name.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .module_modes import eval_mode

__all__ = [
    "ERFResult",
    "effective_receptive_field",
    "erf_maps",
    "resolve_target",
    "feature_map_target",
    "vit_token_target",
    "segmentation_logits_target",
    "segmentation_decoder_target",
    "fit_gaussian_2d",
    "centred_square_side",
    "erf_coverage",
    "grid_positions",
    "summarize_erf",
    "eval_mode",
]

TargetFn = Callable[[torch.Tensor], torch.Tensor]
Position = Tuple[float, float]


@dataclass
class ERFResult:
    """An ERF map and its summary numbers.

    Attributes:
        erf: ``(H, W)`` float64 map, non-negative, sums to 1.
        num_images: Images accumulated.
        position: Fractional ``(fy, fx)`` position of the output unit.
        center_y, center_x: Centre of the fitted Gaussian (input pixels).
        sigma_y, sigma_x: Standard deviations of the fitted Gaussian (input pixels).
        r2: Coefficient of determination of the Gaussian fit.
        side_50, side_90: Side (pixels) of the smallest centred square holding
            50 % / 90 % of the ERF mass.
    """

    erf: torch.Tensor
    num_images: int
    position: Position
    center_y: float
    center_x: float
    sigma_y: float
    sigma_x: float
    r2: float
    side_50: int
    side_90: int

    def numbers(self) -> Dict[str, Any]:
        """Every field but the map, JSON-serialisable."""
        d = asdict(self)
        d.pop("erf")
        d["position"] = list(self.position)
        d["input_size"] = list(self.erf.shape)
        return d


def feature_map_target(model: nn.Module) -> TargetFn:
    """Target of a classification network: its last feature map, NCHW.

    Uses timm's ``forward_intermediates(indices=1, intermediates_only=True,
    output_fmt='NCHW')`` when the model has it (NHWC models are permuted by
    timm), else ``forward_features``, else ``forward``; the result must be
    ``(B, C, h, w)``. Vision transformers take :func:`vit_token_target`
    instead (``target='auto'``), since timm's intermediates precede the final
    norm.
    """
    def fn(x: torch.Tensor) -> torch.Tensor:
        out: Any = None
        if hasattr(model, "forward_intermediates"):
            try:
                out = model.forward_intermediates(x, indices=1, intermediates_only=True, output_fmt="NCHW")
            except (NotImplementedError, TypeError):
                out = None
            if isinstance(out, (list, tuple)):
                out = out[-1]
        if out is None:
            out = model.forward_features(x) if hasattr(model, "forward_features") else model(x)
        if not isinstance(out, torch.Tensor) or out.dim() != 4:
            raise ValueError(f"{type(model).__name__}: the feature map must be (B, C, h, w), got "
                             f"{getattr(out, 'shape', type(out).__name__)}; pass target=<callable> instead")
        return out
    return fn


def _is_vit(model: nn.Module) -> bool:
    """A timm-style vision transformer: patch embedding, blocks, prefix-token count, token features."""
    return (hasattr(model, "patch_embed") and hasattr(model, "blocks") and hasattr(model, "num_prefix_tokens")
            and hasattr(model.patch_embed, "dynamic_feat_size") and hasattr(model, "forward_features"))


def vit_token_target(model: nn.Module) -> TargetFn:
    """Target of a vision transformer: its patch tokens after the final norm, as ``(B, C, h, w)``.

    The GAB paper's ERF (arXiv 2305.04722, section 2) differentiates the
    output tokens after the final normalisation. timm's ``forward_features``
    returns every token after ``model.norm``; the prefix (class, register)
    tokens are dropped and the patch tokens laid out on the patch grid. Models
    whose final norm is ``fc_norm`` (applied after pooling, e.g. timm's relpos
    ViTs with ``global_pool='avg'``; ``model.norm`` is then the identity) get
    that norm applied to each token ([decision]: the same normalisation, per
    token rather than on the pooled vector).
    """
    def fn(x: torch.Tensor) -> torch.Tensor:
        tokens = model.forward_features(x)
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 3:
            raise ValueError(f"{type(model).__name__}.forward_features must give (B, T, C) tokens, got "
                             f"{getattr(tokens, 'shape', type(tokens).__name__)}; pass target=<callable> instead")
        fc_norm = getattr(model, "fc_norm", None)
        if isinstance(fc_norm, nn.Module) and not isinstance(fc_norm, nn.Identity):
            tokens = fc_norm(tokens)
        h, w = model.patch_embed.dynamic_feat_size((x.shape[-2], x.shape[-1]))
        patches = tokens[:, int(model.num_prefix_tokens):]
        if patches.shape[1] != h * w:
            raise ValueError(f"{type(model).__name__}: {patches.shape[1]} patch tokens do not fill the {h}x{w} "
                             f"patch grid of a {tuple(x.shape[-2:])} input")
        return patches.transpose(1, 2).reshape(x.shape[0], -1, h, w)
    return fn


def _resize_like_logits(segmentor: nn.Module, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if out.shape[-2:] != x.shape[-2:]:
        align = bool(getattr(segmentor.decode_head, "align_corners", False))
        out = F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=align)
    return out


def segmentation_decoder_target(segmentor: nn.Module) -> TargetFn:
    """Target of an mmseg segmentor (default): the decoder's features before ``conv_seg``, at the input size.

    The tensor that enters ``decode_head.conv_seg`` (the 1x1 classifier; after
    the head's dropout, the identity in eval) in ``extract_feat`` then
    ``decode_head.forward``, bilinearly resized to the image size with the
    head's ``align_corners`` like the logits. The classifier and the resize
    are linear and commute, so the centre pixel here is the same location as
    the logits' centre pixel.
    """
    conv_seg = getattr(segmentor.decode_head, "conv_seg", None)
    if not isinstance(conv_seg, nn.Module):
        raise ValueError(f"{type(segmentor.decode_head).__name__} has no conv_seg (mmseg's classifier): use "
                         f"target='logits' or a callable")

    def fn(x: torch.Tensor) -> torch.Tensor:
        seen: List[torch.Tensor] = []
        handle = conv_seg.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
        try:
            segmentor.decode_head.forward(segmentor.extract_feat(x))
        finally:
            handle.remove()
        if len(seen) != 1:
            raise ValueError(f"{type(segmentor.decode_head).__name__}.forward called conv_seg {len(seen)} times; "
                             f"pass target='logits' or a callable")
        return _resize_like_logits(segmentor, seen[0], x)
    return fn


def segmentation_logits_target(segmentor: nn.Module) -> TargetFn:
    """Target of an mmseg segmentor: its logits resized to the input size.

    ``segmentor.extract_feat`` then ``decode_head.forward`` (mmseg's
    ``_forward`` tensor mode), bilinearly resized to the image size with the
    head's ``align_corners`` — the same resize ``predict_by_feat`` applies.
    The option ``target='logits'``; see the module docstring for why it is
    not the default.
    """
    def fn(x: torch.Tensor) -> torch.Tensor:
        return _resize_like_logits(segmentor, segmentor.decode_head.forward(segmentor.extract_feat(x)), x)
    return fn


def _is_segmentor(model: nn.Module) -> bool:
    return hasattr(model, "decode_head") and hasattr(model, "extract_feat")


def resolve_target(model: nn.Module, target: Union[str, TargetFn] = "auto") -> TargetFn:
    """The function mapping an image batch to the ``(B, K, h, w)`` output map.

    Args:
        model: The network.
        target: ``'auto'`` (segmentor -> ``'decoder'``, vision transformer ->
            ``'tokens'``, otherwise ``'features'``); ``'decoder'`` (the
            decoder's features before ``conv_seg``, :func:`segmentation_decoder_target`);
            ``'logits'`` (the segmentor's logits); ``'tokens'`` (patch tokens
            after the final norm, :func:`vit_token_target`); ``'features'``
            (a segmentor's ``'decoder'``, a vision transformer's ``'tokens'``,
            else the last feature map, :func:`feature_map_target`);
            ``'output'`` (``model(x)``, must be 4-D) or a callable
            ``x -> (B, K, h, w)``.
    """
    if callable(target) and not isinstance(target, str):
        return target
    if target in ("auto", "features"):
        if not (_is_segmentor(model) or _is_vit(model)):
            return feature_map_target(model)
        target = "decoder" if _is_segmentor(model) else "tokens"
    if target == "output":
        return model
    if target not in _NAMED_TARGETS:
        raise ValueError(f"target must be 'auto', 'features', 'decoder', 'logits', 'tokens', 'output' or a "
                         f"callable, got {target!r}")
    applies, what, build = _NAMED_TARGETS[target]
    if not applies(model):
        raise ValueError(f"target={target!r} needs {what}; {type(model).__name__} is not one: use target='features'")
    return build(model)


#: target name -> (does it apply to the model, what it needs, target builder)
_NAMED_TARGETS: Dict[str, Tuple[Callable[[nn.Module], bool], str, Callable[[nn.Module], TargetFn]]] = {
    "tokens": (_is_vit, "a timm vision transformer (patch_embed, blocks, num_prefix_tokens)", vit_token_target),
    "decoder": (_is_segmentor, "an mmseg segmentor (decode_head, extract_feat)", segmentation_decoder_target),
    "logits": (_is_segmentor, "an mmseg segmentor (decode_head, extract_feat)", segmentation_logits_target),
}


def _check_positions(positions: Sequence[Position]) -> List[Position]:
    out = []
    for p in positions:
        if len(p) != 2 or not all(0.0 <= float(v) < 1.0 for v in p):
            raise ValueError(f"positions are fractional (fy, fx) with 0 <= f < 1, got {p!r}")
        out.append((float(p[0]), float(p[1])))
    if not out:
        raise ValueError("positions must not be empty")
    return out


def grid_positions(n: int) -> List[Position]:
    """An ``n x n`` grid of fractional positions at the cell centres ``(i + 0.5) / n``."""
    if n < 1:
        raise ValueError(f"grid size must be >= 1, got {n}")
    return [((i + 0.5) / n, (j + 0.5) / n) for i in range(n) for j in range(n)]


def erf_maps(model: Union[nn.Module, str, None], images: torch.Tensor,
             positions: Sequence[Position] = ((0.5, 0.5),), target: Union[str, TargetFn] = "auto",
             batch_size: int = 8, normalize: bool = True, progress: bool = False) -> torch.Tensor:
    """ERF maps of several output positions, accumulated over images, batched.

    Every (image, position) pair is one batch element; one backward per batch
    of ``batch_size`` pairs gives every pair's input gradient, which is averaged
    over input channels, clipped at 0 and summed per position (float64).

    Args:
        model: The network (run in eval mode, restored after), a timm model
            name (created with ``pretrained=False``), or None when ``target``
            is a callable that needs no mode handling.
        images: ``(N, C, H, W)`` input batch, already normalised for the model.
        positions: Fractional ``(fy, fx)`` output positions; ``(0.5, 0.5)`` is
            the centre unit ``(h//2, w//2)``.
        target: See :func:`resolve_target`.
        batch_size: (image, position) pairs per backward. 1 is the per-image loop.
        normalize: Normalise each map to sum 1 (else the raw accumulated sums).
        progress: Show a tqdm progress bar over batches.

    Returns:
        ``(P, H, W)`` float64 maps.

    Raises:
        ValueError: bad images / positions / batch_size, or a map that is zero
            everywhere (no positive gradient reached the input).
    """
    model = _build(model)
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise ValueError(f"images must be an (N, C, H, W) tensor, got "
                         f"{getattr(images, 'shape', type(images).__name__)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    pos = _check_positions(positions)
    if model is None and not callable(target):
        raise ValueError("model=None needs a callable target")
    fn = target if model is None else resolve_target(model, target)
    n, _, h_in, w_in = images.shape
    pairs = [(i, p) for i in range(n) for p in range(len(pos))]
    acc = torch.zeros(len(pos), h_in, w_in, dtype=torch.float64, device=images.device)
    chunks = [pairs[k:k + batch_size] for k in range(0, len(pairs), batch_size)]
    if progress:
        from tqdm import tqdm
        chunks = tqdm(chunks, desc="ERF", unit="batch")
    with eval_mode(model), torch.enable_grad():
        for chunk in chunks:
            img_idx = torch.tensor([c[0] for c in chunk], device=images.device)
            pos_idx = torch.tensor([c[1] for c in chunk], device=images.device)
            x = images.index_select(0, img_idx).detach().requires_grad_(True)
            out = fn(x)
            if not isinstance(out, torch.Tensor) or out.dim() != 4 or out.shape[0] != x.shape[0]:
                raise ValueError(f"the target must give (B, K, h, w) with B={x.shape[0]}, got "
                                 f"{getattr(out, 'shape', type(out).__name__)}")
            h, w = out.shape[-2:]
            ys = torch.tensor([min(int(math.floor(pos[c[1]][0] * h)), h - 1) for c in chunk], device=out.device)
            xs = torch.tensor([min(int(math.floor(pos[c[1]][1] * w)), w - 1) for c in chunk], device=out.device)
            units = out[torch.arange(out.shape[0], device=out.device), :, ys, xs]  # (B, K)
            (grad,) = torch.autograd.grad(units.mean(dim=1).sum(), x)
            per_pair = grad.detach().mean(dim=1).clamp_min(0).to(torch.float64)  # RGB mean, clip at 0
            acc.index_add_(0, pos_idx, per_pair)
    if normalize:
        sums = acc.sum(dim=(1, 2))
        if bool((sums <= 0).any()):
            bad = [pos[i] for i in torch.nonzero(sums <= 0).flatten().tolist()]
            raise ValueError(f"the ERF is zero everywhere at positions {bad}: no positive gradient reached the "
                             f"input (dead units or a constant output)")
        acc = acc / sums[:, None, None]
    return acc


def _build(model: Union[nn.Module, str, None]) -> Optional[nn.Module]:
    if isinstance(model, str):
        import timm
        return timm.create_model(model, pretrained=False)
    return model


def effective_receptive_field(model: Union[nn.Module, str], images: torch.Tensor,
                              target: Union[str, TargetFn] = "auto", position: Position = (0.5, 0.5),
                              batch_size: int = 8, progress: bool = False) -> ERFResult:
    """The ERF of one output unit and its summary numbers.

    Args:
        model: A classification network (centre of its last feature map,
            channel-averaged; a vision transformer's patch tokens after the
            final norm), a timm model name (``pretrained=False``), or an mmseg
            segmentor (centre pixel of the decoder's features before
            ``conv_seg``). Run in eval mode.
        images: ``(N, C, H, W)`` images, normalised as the model expects.
        target: See :func:`resolve_target`.
        position: Fractional ``(fy, fx)`` of the output unit (default: centre).
        batch_size: Images per backward; the result does not depend on it.
        progress: Show a progress bar.

    Returns:
        An :class:`ERFResult`.
    """
    erf = erf_maps(model, images, positions=[position], target=target, batch_size=batch_size,
                   progress=progress)[0]
    return ERFResult(erf=erf, num_images=int(images.shape[0]), position=tuple(position), **summarize_erf(erf))


def summarize_erf(erf: torch.Tensor) -> Dict[str, Any]:
    """Gaussian fit and 50 % / 90 % square sides of a normalised ERF map."""
    fit = fit_gaussian_2d(erf)
    return dict(center_y=fit["center_y"], center_x=fit["center_x"], sigma_y=fit["sigma_y"],
                sigma_x=fit["sigma_x"], r2=fit["r2"], side_50=centred_square_side(erf, 0.5),
                side_90=centred_square_side(erf, 0.9))


def _check_map(erf: torch.Tensor) -> torch.Tensor:
    if not isinstance(erf, torch.Tensor) or erf.dim() != 2:
        raise ValueError(f"expected an (H, W) map, got {getattr(erf, 'shape', type(erf).__name__)}")
    erf = erf.detach().to(torch.float64)
    if bool((erf < 0).any()) or float(erf.sum()) <= 0:
        raise ValueError("the ERF map must be non-negative with a positive sum")
    return erf


def _centroid(erf: torch.Tensor) -> Tuple[float, float]:
    h, w = erf.shape
    total = erf.sum()
    ys = torch.arange(h, dtype=erf.dtype, device=erf.device)
    xs = torch.arange(w, dtype=erf.dtype, device=erf.device)
    return float((erf.sum(1) * ys).sum() / total), float((erf.sum(0) * xs).sum() / total)


def fit_gaussian_2d(erf: torch.Tensor, iterations: int = 200) -> Dict[str, float]:
    """Least-squares fit of ``A exp(-(x-x0)^2/(2 sx^2) - (y-y0)^2/(2 sy^2))``.

    Levenberg-Marquardt from the moments of the map, in float64.

    Args:
        erf: ``(H, W)`` non-negative map.
        iterations: Maximum LM iterations.

    Returns:
        ``amplitude, center_y, center_x, sigma_y, sigma_x`` (pixels) and
        ``r2 = 1 - SS_res / SS_tot`` of the fit.
    """
    z = _check_map(erf)
    z = z / z.sum()
    h, w = z.shape
    yy, xx = torch.meshgrid(torch.arange(h, dtype=z.dtype), torch.arange(w, dtype=z.dtype), indexing="ij")
    yy, xx, zf = yy.flatten(), xx.flatten(), z.flatten().cpu()
    cy, cx = _centroid(z.cpu())
    sy = math.sqrt(max(float((zf * (yy - cy) ** 2).sum()), 0.25))
    sx = math.sqrt(max(float((zf * (xx - cx) ** 2).sum()), 0.25))
    p = torch.tensor([float(zf.max()), cy, cx, sy, sx], dtype=torch.float64)

    def model_and_jac(p: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        a, y0, x0, s_y, s_x = p.tolist()
        dy, dx = yy - y0, xx - x0
        e = torch.exp(-0.5 * (dy ** 2 / s_y ** 2 + dx ** 2 / s_x ** 2))
        g = a * e
        jac = torch.stack([e, g * dy / s_y ** 2, g * dx / s_x ** 2, g * dy ** 2 / s_y ** 3,
                           g * dx ** 2 / s_x ** 3], dim=1)
        return g, jac

    g, jac = model_and_jac(p)
    loss = float(((g - zf) ** 2).sum())
    lam = 1e-3
    for _ in range(iterations):
        r = zf - g
        jtj = jac.T @ jac
        jtr = jac.T @ r
        step = torch.linalg.solve(jtj + lam * torch.diag(torch.diag(jtj) + 1e-30), jtr)
        cand = p + step
        cand[3:] = cand[3:].abs().clamp_min(1e-3)
        g2, jac2 = model_and_jac(cand)
        loss2 = float(((g2 - zf) ** 2).sum())
        if loss2 < loss:
            converged = (loss - loss2) <= 1e-12 * max(loss, 1e-300)
            p, g, jac, loss, lam = cand, g2, jac2, loss2, max(lam / 10, 1e-12)
            if converged:
                break
        else:
            lam *= 10
            if lam > 1e12:
                break
    ss_tot = float(((zf - zf.mean()) ** 2).sum())
    r2 = 1.0 - loss / ss_tot if ss_tot > 0 else float("nan")
    a, y0, x0, s_y, s_x = p.tolist()
    return dict(amplitude=a, center_y=y0, center_x=x0, sigma_y=abs(s_y), sigma_x=abs(s_x), r2=r2)


def centred_square_side(erf: torch.Tensor, fraction: float, center: Optional[Tuple[int, int]] = None) -> int:
    """Side of the smallest centred square holding ``fraction`` of the ERF mass.

    Args:
        erf: ``(H, W)`` non-negative map.
        fraction: Mass fraction in (0, 1].
        center: ``(y, x)`` pixel of the square's centre; default the pixel
            nearest to the map's centre of mass.

    Returns:
        The odd side ``2k + 1`` of the smallest square (clipped at the image
        border) whose mass is at least ``fraction`` of the total.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    z = _check_map(erf).cpu()
    h, w = z.shape
    if center is None:
        cyf, cxf = _centroid(z)
        center = (int(math.floor(cyf + 0.5)), int(math.floor(cxf + 0.5)))
    cy, cx = center
    total = float(z.sum())
    cum = F.pad(z.cumsum(0).cumsum(1), (1, 0, 1, 0))  # cum[i, j] = sum z[:i, :j]
    for k in range(max(h, w) + 1):
        y0, y1 = max(cy - k, 0), min(cy + k + 1, h)
        x0, x1 = max(cx - k, 0), min(cx + k + 1, w)
        mass = float(cum[y1, x1] - cum[y0, x1] - cum[y1, x0] + cum[y0, x0])
        if mass >= fraction * total * (1 - 1e-9):
            return 2 * k + 1
    return 2 * max(h, w) + 1  # unreachable: the last square covers the image


def erf_coverage(erf: torch.Tensor, threshold: float = 0.01) -> torch.Tensor:
    """Fraction of the image where the ERF exceeds ``threshold`` times its maximum.

    Args:
        erf: ``(H, W)`` or ``(P, H, W)`` maps (one per output position).
        threshold: Relative level in (0, 1).

    Returns:
        A scalar (or ``(P,)``) float64 tensor in [0, 1].
    """
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    maps = erf if erf.dim() == 3 else erf[None]
    peak = maps.flatten(1).amax(dim=1)[:, None, None]
    cov = (maps > threshold * peak).flatten(1).to(torch.float64).mean(dim=1)
    return cov if erf.dim() == 3 else cov[0]
