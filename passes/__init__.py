"""Graph passes of mpm_fx (installed as ``mpm_fx.passes``): capture, find blocks and taps,
insert merges and reconstructions. The FX pass lands with issue 3."""
