"""The cache of large CPU output buffers: reuse, correctness of reused buffers, limit, release."""
import os
import subprocess
import sys

import torch

import lethe
from lethe.ops.quant_reference import fake_quantize_codes


def test_reused_buffers_hold_fresh_results():
    lethe.ops.empty_cpu_cache()
    before = lethe.ops.cpu_cache_info()
    shape = (512, 1024)  # 2 MiB: cached
    for seed in range(3):
        x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
        y, mask = torch.ops.lethe.fake_quantize(x, 128, 4, 0, False, 1.0, True)
        y_ref, mask_ref = fake_quantize_codes(x, 128, 4, 0, False, 1.0)
        assert torch.equal(y, y_ref) and torch.equal(mask, mask_ref)
        del y, mask
    after = lethe.ops.cpu_cache_info()
    assert after["hits"] - before["hits"] >= 2  # the second and third calls reused buffers
    assert after["cached_buffers"] >= 1
    lethe.ops.empty_cpu_cache()
    assert lethe.ops.cpu_cache_info()["cached_bytes"] == 0


def test_live_outputs_are_never_shared():
    x = torch.randn(512, 1024)
    a = lethe.fake_quantize(x, "int8")
    b = lethe.fake_quantize(x * 2, "int8")
    assert a.data_ptr() != b.data_ptr()
    torch.testing.assert_close(b, lethe.fake_quantize(x * 2, "int8", backend="reference"), rtol=0, atol=0)


def test_cache_limit_zero_disables_it():
    code = (
        "import torch, lethe\n"
        "x = torch.randn(512, 1024)\n"
        "for _ in range(3): lethe.fake_quantize(x, 'int8')\n"
        "i = lethe.ops.cpu_cache_info()\n"
        "assert i['limit_bytes'] == 0 and i['cached_bytes'] == 0 and i['hits'] == 0, i\n"
        "print('ok')\n"
    )
    env = dict(os.environ, LETHE_CPU_CACHE_MB="0")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr
