"""SafeCtrl training: stage 1 the Unsafe Attention Block (mask CE + MSE), stage 2 the Safety Guidance Block
(W_K', W_V') with Diffusion-DPO. Modules: guards/safectrl.py; data: :mod:`train.safectrl.data`."""
