"""Reference computations for the GAB Swin tests (timm and mmseg share the attribute names used here)."""
import torch


def gaussian_of_offsets(attn) -> torch.Tensor:
    """``(2Wh-1)(2Ww-1) x P`` table of a² · exp(-(dh² + dw²) / (2σ²)), in the relative-position-table order."""
    wh, ww = attn.window_size
    dh = torch.arange(-(wh - 1), wh, dtype=torch.float64)[:, None]
    dw = torch.arange(-(ww - 1), ww, dtype=torch.float64)[None, :]
    sigma, amp = attn.gab.gab_sigma.detach().double().abs(), attn.gab.gab_amplitude.detach().double()
    return amp ** 2 * torch.exp(-(dh * dh + dw * dw).flatten()[:, None] / (2 * sigma ** 2))


def state_with_gab_in_tables(gab_model: torch.nn.Module) -> dict:
    """The GAB model's state without σ, a, each relative position bias table plus the Gaussian of its offsets:
    the state of a plain Swin that must compute exactly what the GAB Swin computes."""
    state = {k: v for k, v in gab_model.state_dict().items() if ".gab." not in k}
    for name, m in gab_model.named_modules():
        if hasattr(m, "gab") and hasattr(m, "relative_position_bias_table"):
            key = name + ".relative_position_bias_table"
            state[key] = (state[key].double() + gaussian_of_offsets(m)).to(state[key].dtype)
    return state


def explicit_window_attention(attn, x: torch.Tensor, mask) -> torch.Tensor:
    """softmax(q kᵀ·scale + relpos + GAB + mask) v and the output projection, the biases written with loops."""
    wh, ww = attn.window_size
    n, heads = wh * ww, attn.num_heads
    table = attn.relative_position_bias_table.detach()
    sigma = attn.gab.gab_sigma.detach().abs()
    amp = attn.gab.gab_amplitude.detach()
    bias = torch.zeros(heads, n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(n):
            dh, dw = i // ww - j // ww, i % ww - j % ww
            rel = table[(dh + wh - 1) * (2 * ww - 1) + (dw + ww - 1)]  # (heads,)
            gauss = amp ** 2 * torch.exp(-torch.tensor(float(dh * dh + dw * dw), dtype=torch.float64)
                                         / (2 * sigma ** 2))
            bias[:, i, j] = rel + gauss
    B_, N, C = x.shape
    qkv = torch.nn.functional.linear(x, attn.qkv.weight, attn.qkv.bias).reshape(B_, N, 3, heads, -1)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    logits = q @ k.transpose(-2, -1) * attn.scale + bias
    if mask is not None:
        num_win = mask.shape[0]
        logits = (logits.view(-1, num_win, heads, N, N) + mask[None, :, None]).view(-1, heads, N, N)
    out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(B_, N, -1)
    return torch.nn.functional.linear(out, attn.proj.weight, attn.proj.bias)
