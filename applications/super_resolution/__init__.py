"""Super-resolution with a conditional flow (SRFlow-style).

After "SRFlow: Learning the Super-Resolution Space with Normalizing Flow" (Lugmayr, Danelljan,
Van Gool and Timofte, 2020, arXiv:2006.14759): a conditional Glow models the high-resolution image
given the low-resolution one, is trained by likelihood and sampled with a temperature. See
README.md in this folder for the commands, the figures and the numbers.

``python -m applications.super_resolution`` trains through invnet's trainer (``__main__``).
Modules: ``degradation`` (the downscaling operator and bicubic baseline), ``data`` (offline
images cut into patches, split by image, and the simulator of training pairs), ``metrics`` (PSNR,
SSIM, LR consistency, diversity), ``model`` (the conditional flow), ``tiles`` (large images in
overlapping tiles), ``checkpoints`` (reading a run), ``evaluate``, ``sample`` and ``make_pairs``
(command-line entry points, ``python -m applications.super_resolution.NAME``).
"""
