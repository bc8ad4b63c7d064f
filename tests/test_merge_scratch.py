"""The merge engine's scratch pool: temporaries are reused job after job, never shared by jobs in flight."""

import threading

import torch

from releaser.merge import scratch

MB = 1 << 20


def test_temporaries_are_reused_after_the_job():
    pool = scratch.Pool(64 * MB)
    with scratch.job(pool):
        first = scratch.empty((2 * MB,), torch.float32)
        ptr = first.data_ptr()
    assert pool.idle_bytes == 8 * MB
    with scratch.job(pool):
        again = scratch.empty((1024, 1536), torch.float32)   # 6 MB fits the idle 8 MB buffer
        assert again.data_ptr() == ptr and again.shape == (1024, 1536) and again.dtype == torch.float32
        other = scratch.empty((2 * MB,), torch.float32)      # the idle one is taken: a new buffer
        assert other.data_ptr() != ptr
    assert pool.idle_bytes == 16 * MB


def test_outside_a_job_small_or_too_large_buffers_are_not_pooled():
    pool = scratch.Pool(64 * MB)
    assert scratch.empty((3, 4), torch.float32).shape == (3, 4)      # no job: plain torch.empty
    with scratch.job(pool):
        scratch.empty((16,), torch.float32)                           # small: plain torch.empty
        scratch.empty((8 * MB,), torch.float32)                       # 32 MB
    assert pool.idle_bytes == 32 * MB
    with scratch.job(pool):
        scratch.empty((MB,), torch.float32)                           # 4 MB: the 32 MB buffer is freed, not used
    assert pool.idle_bytes == 4 * MB
    limited = scratch.Pool(2 * MB)
    with scratch.job(limited):
        scratch.empty((MB,), torch.float32)
    assert limited.idle_bytes == 0                                    # over the limit: given back to the allocator


def test_cast_is_to_and_jobs_in_threads_do_not_share_buffers():
    pool = scratch.Pool(256 * MB)
    x = torch.randn(MB)
    with scratch.job(pool):
        y = scratch.cast(x, torch.bfloat16)
        assert torch.equal(y, x.to(torch.bfloat16)) and scratch.cast(x, torch.float32) is x
    ptrs, barrier = [], threading.Barrier(4)

    def work():
        with scratch.job(pool):
            t = scratch.empty((MB,), torch.float32)
            ptrs.append(t.data_ptr())
            barrier.wait()

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(ptrs)) == 4
