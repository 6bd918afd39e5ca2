# NaN-safe depth training ("Analysis of NaN Divergence in Training Monocular Depth
# Estimation Model", Kim, Jang & Kim) on vpdhead_r50_4xb8-25k_nyu-480x480.py:
# - StableSiLogLoss: the SILog loss with a guarded sqrt (sqrt(D + 1e-6)), the variance in its
#   two-pass form, samples with < 2 valid pixels contributing 0 (never nan);
# - StableVPDDepthHead(log_space=True): log depth = log(max_depth) + logsigmoid(x) instead of
#   log(clamp(sigmoid(x) * max_depth)), so saturated pixels keep their gradient;
# - NonFiniteLossHook: stops at the first non-finite loss, naming the iteration, the term
#   and the valid-pixel counts.
# Evaluation is the same depth as the baseline's with the same weights.
_base_ = ['./vpdhead_r50_4xb8-25k_nyu-480x480.py']
model = dict(decode_head=dict(
    type='StableVPDDepthHead', log_space=True,
    loss_decode=dict(type='StableSiLogLoss', sqrt_mode='eps', sqrt_eps=1e-6)))
custom_hooks = [dict(type='NonFiniteLossHook')]
