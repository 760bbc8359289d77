"""pqcompile.kernels.settings: override changes fields for a block and restores them, checked like the
constructor."""

import dataclasses

import pytest

from pqcompile.kernels import KernelSettings, LaunchConfig, Tile, settings


def test_override_restores_on_exit_and_on_error():
    before = (settings.autotune, settings.attention, settings.encode_tile)
    small = settings.attention._replace(block_n=32, maxnreg=168)
    with settings.override(autotune=False, attention=small, encode_tile=(16, 4)) as s:
        assert s is settings and not settings.autotune and settings.attention == small
        assert settings.encode_tile == Tile(16, 4)  # a plain tuple is converted
        with pytest.raises(RuntimeError), settings.override(autotune=True):
            raise RuntimeError
        assert not settings.autotune  # the inner override restored its own change only
    assert (settings.autotune, settings.attention, settings.encode_tile) == before


def test_override_rejects_unknown_fields_and_bad_configs():
    before = dataclasses.replace(settings)
    with pytest.raises(TypeError), settings.override(ablate=1):
        pass
    with pytest.raises(ValueError, match="block_n"), settings.override(attention=LaunchConfig(48, True, 2, 4, 3)):
        pass
    with pytest.raises(ValueError, match="pair_chunks"):
        KernelSettings(tuned_space=[LaunchConfig(64, True, 2, 4, 3, pair_chunks=0)])
    assert settings == before
