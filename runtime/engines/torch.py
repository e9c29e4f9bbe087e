"""The PyTorch reference engine: `MaskedAutoencoder.forward_encoder` / `forward_decoder` in eager mode.

torch is imported here only, when the engine is created, so `mae.runtime` stays torch-free.
`model` is weights that `mae.weights.load_model` reads, a bundle (its recorded source weights are loaded), or a
`MaskedAutoencoder` instance (shared between the encoder and decoder engines, and used by training previews).
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np

from mae.core import hardware
from mae.core.bundle import OUTPUT_NAMES, Bundle, is_bundle, no_decoder_error
from mae.core.errors import MAEError
from mae.core.integrity import verify_source

from .base import check_inputs

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def bundle_source(model: object, fresh: bool = False) -> Path | None:
    """A bundle's recorded source weights, or None when `model` is not a bundle."""
    if not is_bundle(Path(str(model))):
        return None
    bundle = Bundle.load(Path(str(model)))
    source_path = bundle.source_weights("The torch engine", hint="pass the weights file itself with --model")
    verify_source(bundle.path, bundle.manifest, source_path, fresh=fresh)
    return source_path


def load_weights(path: str | Path):  # noqa: ANN201 - (MaskedAutoencoder, LoadedWeights)
    """Any weights `mae.weights` reads, as an fp32 CPU model in eval mode: the one place runtime/ loads torch."""
    from mae.weights import load_model

    return load_model(Path(path), device="cpu")


def torch_details() -> dict[str, object]:
    """What PyTorch sees here, for `mae info --system` and `mae bench`: the CUDA it was built for, and GPUs."""
    import torch

    available = torch.cuda.is_available()
    return {
        "cuda_build": torch.version.cuda,  # None for CPU-only builds
        "cuda_available": available,
        "cuda_devices": torch.cuda.device_count() if available else 0,
    }


def matmul_seconds(size: int, precision: str = "bf16", runs: int = 5) -> tuple[float, str]:
    """(best seconds of a CPU size x size x size matrix product at `precision`, torch version): PyTorch's side of
    the bf16 peak in the roofline of `mae bench`."""
    import time

    import torch

    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randn(size, size, generator=generator).to(getattr(torch, DTYPES[precision])) for _ in range(2))
    with torch.inference_mode():
        torch.mm(a, b)  # warm-up
        best = float("inf")
        for _ in range(max(1, runs)):
            began = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - began)
    return max(best, 1e-9), torch.__version__


class TorchEngine:
    """One graph of the PyTorch model, fp32 or bf16 (fp16 on CUDA), on CPU or CUDA.

    allow_emulated_bf16: run bf16 on a CPU without bf16 instructions anyway (refused otherwise: emulated, it is
    many times slower than fp32).
    """

    name = "torch"

    def __init__(
        self,
        model: object,
        part: str = "encoder",
        precision: str = "fp32",
        device: str = "cpu",
        num_threads: int | None = None,
        allow_emulated_bf16: bool = False,
    ) -> None:
        try:
            import torch
        except ImportError as exc:
            raise MAEError("The torch engine needs PyTorch.", hint="pip install torch (https://pytorch.org)") from exc
        # the torch side, imported only once the engine is created (mae.runtime stays torch-free at import)
        from mae.distributed import resolve_device
        from mae.model import MaskedAutoencoder

        self.torch = torch
        self.part = part
        self.precision = precision
        if precision not in DTYPES:
            raise MAEError(f"The torch engine runs fp32, bf16 or fp16, not {precision!r}.")
        self.device = str(resolve_device(device))  # cpu, cuda or cuda:N
        if precision == "fp16" and not self.device.startswith("cuda"):
            raise MAEError(
                "fp16 in the torch engine needs CUDA.",
                hint="use --precision fp32 (or bf16 on a CPU with bf16 instructions: AMX / AVX512-BF16)",
            )
        if precision == "bf16" and self.device == "cpu":
            hardware.require_native_bf16("bf16 in the torch engine", allow_emulated=allow_emulated_bf16)
        if num_threads:
            torch.set_num_threads(int(num_threads))  # process-wide, as PyTorch has no per-model setting

        self.dtype = getattr(torch, DTYPES[precision])
        if isinstance(model, MaskedAutoencoder):
            network, source = model, "in-memory model"
            current = next(network.parameters())
            if current.dtype != self.dtype or current.device != torch.device(self.device):
                network = copy.deepcopy(network)  # Module.to() converts in place: leave the caller's model alone
        else:
            path = bundle_source(model) or Path(str(model))
            if not path.exists():
                raise MAEError(f"{path} does not exist.", hint="pass a checkpoint, official .pth, HF dir or bundle")
            network, _ = load_weights(path)
            source = path.name
        if part == "decoder" and not network.has_decoder:
            raise no_decoder_error(source)
        self.network = network.eval().to(device=self.device, dtype=self.dtype)
        self.config = network.cfg
        threads = f", {torch.get_num_threads()} threads" if self.device == "cpu" else ""
        self.description = f"torch {torch.__version__} eager {self.device} {precision} ({source}{threads})"

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self.torch
        checked = check_inputs(self.part, inputs)
        data_name, ids_name = checked
        data = torch.from_numpy(checked[data_name]).to(self.device, self.dtype)
        ids = torch.from_numpy(checked[ids_name]).to(self.device)
        self._check_ids(ids, data)
        with torch.inference_mode():
            if self.part == "encoder":
                output = self.network.forward_encoder(data, ids)  # [B, 1+K, D]
            else:
                output = self.network.forward_decoder(data, ids)  # [B, L, p*p*3]
        name = OUTPUT_NAMES[self.part][0]
        return {name: output.float().cpu().numpy()}

    def _check_ids(self, ids, data) -> None:  # noqa: ANN001 - torch tensors
        """Out-of-range indices would raise deep inside torch.gather; say what is wrong instead."""
        length = self.config.num_patches
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= length):
            raise MAEError(f"patch indices must be in [0, {length}), got [{int(ids.min())}, {int(ids.max())}]")
        if self.part == "encoder" and tuple(data.shape[1:]) != (3, self.config.img_size, self.config.img_size):
            size = self.config.img_size
            raise MAEError(f"pixel_values must be [B, 3, {size}, {size}] for this model, got {tuple(data.shape)}")
