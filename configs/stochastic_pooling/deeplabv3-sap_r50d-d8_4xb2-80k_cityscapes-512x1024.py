# Stochastic average pooling (Kim & Kim, "Stochastic Subsampling With Average Pooling",
# arXiv 2409.16630) on deeplabv3_r50d-d8_4xb2-80k_cityscapes-512x1024.py:
# - backbone ResNetV1dSAP: SAP in the avg_down shortcut pooling (in the D8 layout only
#   stage 2's shortcut pool pools; the dilated stages have kernel-1 pools);
# - SAPEncoderDecoder: the head's average pooling (PSP's pyramid bins / ASPP's image pool)
#   becomes SAP. This one line is the switch for any EncoderDecoder config.
# Evaluation is bit-identical to the baseline's with the same weights.
_base_ = ['./deeplabv3_r50d-d8_4xb2-80k_cityscapes-512x1024.py']
custom_imports = dict(imports=['kim_plugins.mmseg'], allow_failed_imports=False)
model = dict(
    type='SAPEncoderDecoder', sap_keep_prob=0.5,
    backbone=dict(type='ResNetV1dSAP', sap_keep_prob=0.5))
