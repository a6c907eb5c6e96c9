"""Plans presets and Mamba-aware experiment planners for our networks.

None ship yet: our trainers read nnU-Net's own plans (default and ResEnc presets) as they are.
"""
