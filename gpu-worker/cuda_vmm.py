"""A KV range on CUDA that grows in place: virtual addresses reserved up front, physical memory
mapped behind them as the cache grows (CUDA virtual memory management, through cuda-python).

This is the CUDA side of ``KVCache``'s promise: a member that drops layers re-reads its blocks
with a thinner geometry and appends blocks in the freed bytes *at the end of the same range*,
so no block moves. ``cuMemAddressReserve`` reserves the whole range (no memory yet);
``grow`` maps physical chunks (``cuMemCreate`` + ``cuMemMap`` + ``cuMemSetAccess``) behind the
next addresses and zeroes them; ``shrink`` unmaps and releases the tail on a restore. The range
is one torch tensor over the reserved addresses (``__cuda_array_interface__``); only its mapped
prefix may be touched.

NOT VERIFIED: written against the CUDA driver API's documented semantics and never run here
(the development machine has no GPU). ``tests/test_cuda_paths.py`` exercises it on a machine
that has one and skips with that reason elsewhere.
"""

from __future__ import annotations

from typing import Any

import torch


def _driver() -> Any:
    try:
        from cuda.bindings import driver  # cuda-python >= 12.6
    except ImportError:
        from cuda import cuda as driver  # older cuda-python
    return driver


def available() -> bool:
    """Whether CUDA VMM can be used here (a device and cuda-python)."""
    if not torch.cuda.is_available():
        return False
    try:
        _driver()
    except ImportError:
        return False
    return True


class CudaVMMError(RuntimeError):
    pass


def _check(result: tuple) -> Any:
    error, *values = result
    driver = _driver()
    if error != driver.CUresult.CUDA_SUCCESS:
        _, name = driver.cuGetErrorName(error)
        raise CudaVMMError(f"CUDA driver call failed: {name.decode() if name else error}")
    return values[0] if len(values) == 1 else values


class _ArrayInterface:
    """What ``torch.as_tensor`` needs to alias raw device memory."""

    def __init__(self, pointer: int, nbytes: int) -> None:
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1",
                                         "data": (pointer, False), "version": 3}


class GrowableDeviceRange:
    def __init__(self, capacity_bytes: int, device: torch.device) -> None:
        driver = _driver()
        torch.cuda.init()  # a primary context for the device
        self.device = device
        index = device.index if device.index is not None else torch.cuda.current_device()
        prop = driver.CUmemAllocationProp()
        prop.type = driver.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
        prop.location.type = driver.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        prop.location.id = index
        self._prop = prop
        access = driver.CUmemAccessDesc()
        access.location.type = driver.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        access.location.id = index
        access.flags = driver.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
        self._access = access
        self.granularity = int(_check(driver.cuMemGetAllocationGranularity(
            prop, driver.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_MINIMUM)))
        self.capacity_bytes = self._round_up(max(1, capacity_bytes))
        self._base = int(_check(driver.cuMemAddressReserve(self.capacity_bytes, 0, 0, 0)))
        self._chunks: list[tuple[int, int, Any]] = []  # (offset, size, handle)
        self.mapped_bytes = 0
        self.bytes = torch.as_tensor(_ArrayInterface(self._base, self.capacity_bytes),
                                     device=device)  # (capacity,) uint8 over the range

    def _round_up(self, nbytes: int) -> int:
        return -(-nbytes // self.granularity) * self.granularity

    def grow(self, nbytes: int) -> None:
        """Map physical memory behind the range's first ``nbytes`` (zeroed)."""
        target = self._round_up(nbytes)
        if target > self.capacity_bytes:
            raise CudaVMMError(f"{nbytes} bytes exceed the reserved {self.capacity_bytes}")
        if target <= self.mapped_bytes:
            return
        driver = _driver()
        offset, size = self.mapped_bytes, target - self.mapped_bytes
        handle = _check(driver.cuMemCreate(size, self._prop, 0))
        pointer = driver.CUdeviceptr(self._base + offset)
        _check(driver.cuMemMap(pointer, size, 0, handle, 0))
        _check(driver.cuMemSetAccess(pointer, size, [self._access], 1))
        self._chunks.append((offset, size, handle))
        self.mapped_bytes = target
        self.bytes[offset:target].zero_()

    def shrink(self, nbytes: int) -> None:
        """Unmap and release whole chunks past ``nbytes`` (the restore gives memory back to
        the parameters)."""
        driver = _driver()
        torch.cuda.synchronize(self.device)
        while self._chunks and self._chunks[-1][0] >= nbytes:
            offset, size, handle = self._chunks.pop()
            _check(driver.cuMemUnmap(driver.CUdeviceptr(self._base + offset), size))
            _check(driver.cuMemRelease(handle))
            self.mapped_bytes = offset

    def close(self) -> None:
        self.shrink(0)
        _check(_driver().cuMemAddressFree(driver_pointer(self._base), self.capacity_bytes))


def driver_pointer(address: int) -> Any:
    return _driver().CUdeviceptr(address)
