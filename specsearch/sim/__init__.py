"""The paired survey simulator: ``lrs_synth`` (LAMOST-like LRS from labels), ``xp_emulator``
(Gaia XP from labels, trained on real spectra) and ``simulate`` (a release of both, with injected
anomalies and a truth table)."""
