"""A KServe InferenceService for the bundle's Triton repository (``trimformer package --layout kserve``).

``kserve`` writes the Triton repository (``trimformer.packaging.triton``) and
``kserve/inferenceservice.yaml``: ``serving.kserve.io/v1beta1`` ``InferenceService`` whose predictor
serves that repository with KServe's Triton runtime (``modelFormat: triton``, ``runtime:
kserve-tritonserver``) over the Open Inference Protocol (``protocolVersion: v2``), from
``--kserve-storage-uri`` (where the bundle's ``triton/`` folder is uploaded), with the CPU and memory
given (and one GPU when the Triton entries run on one). Clients then call
``/v2/models/NAME/infer`` with the request body ``trimformer serve`` takes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import yaml

from trimformer.errors import UserError

__all__ = ["KSERVE_FILE", "KServeOptions", "inference_service", "kubernetes_name"]

KSERVE_FILE = "kserve/inferenceservice.yaml"
# Schemes KServe's storage initializer downloads from.
_SCHEMES = ("s3://", "gs://", "pvc://", "https://", "http://", "hdfs://", "webhdfs://", "oci://", "hf://")
_CPU = re.compile(r"\A(\d+(\.\d+)?|\d+m)\Z")
_MEMORY = re.compile(r"\A\d+(\.\d+)?(Ki|Mi|Gi|Ti|k|M|G|T)?\Z")
# metadata.name: a DNS-1035 label (an InferenceService's name becomes a service's).
_DNS_LABEL = re.compile(r"\A[a-z]([-a-z0-9]{0,61}[a-z0-9])?\Z")


@dataclass(frozen=True)
class KServeOptions:
    """Where the repository will be, and the predictor's resources (Kubernetes quantities)."""

    storage_uri: str | None = None
    cpu: str = "2"
    memory: str = "2Gi"

    def check(self) -> None:
        if not self.storage_uri:
            raise UserError(
                "--layout kserve needs --kserve-storage-uri: where the bundle's triton/ folder will be "
                "uploaded (for example s3://models/sentiment/triton or pvc://models/sentiment/triton)"
            )
        if not self.storage_uri.startswith(_SCHEMES):
            raise UserError(
                f"--kserve-storage-uri {self.storage_uri!r} is not a location KServe downloads from; "
                f"use one of {', '.join(s.removesuffix('://') for s in _SCHEMES)}"
            )
        if not _CPU.match(self.cpu):
            raise UserError(f"--kserve-cpu takes a Kubernetes CPU quantity (2, 0.5, 500m), got {self.cpu!r}")
        if not _MEMORY.match(self.memory):
            raise UserError(
                f"--kserve-memory takes a Kubernetes memory quantity (2Gi, 512Mi), got {self.memory!r}"
            )


def kubernetes_name(name: str) -> str:
    """The model's name as an InferenceService name: lower case, '-' for '_' and '.'; refused if it
    still is not one."""
    converted = re.sub(r"[_.]", "-", name.lower())
    if not _DNS_LABEL.match(converted):
        raise UserError(
            f"{name!r} cannot name an InferenceService ({converted!r} is not a lower-case DNS label of at "
            "most 63 letters, digits and '-', starting with a letter); pass --name"
        )
    return converted


def inference_service(model: str, options: KServeOptions, gpu: bool) -> str:
    """The InferenceService's YAML: the Triton repository's ensemble ``model`` over the v2 protocol."""
    quantities: dict[str, Any] = {"cpu": options.cpu, "memory": options.memory}
    if gpu:
        quantities["nvidia.com/gpu"] = "1"
    service = {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {
            "name": kubernetes_name(model),
            "labels": {"app.kubernetes.io/managed-by": "trimformer"},
            # Clients call /v2/models/<this>/infer: the repository's ensemble.
            "annotations": {"trimformer/model-name": model},
        },
        "spec": {
            "predictor": {
                "model": {
                    "modelFormat": {"name": "triton"},
                    "runtime": "kserve-tritonserver",
                    "protocolVersion": "v2",
                    "storageUri": options.storage_uri,
                    "resources": {"requests": dict(quantities), "limits": dict(quantities)},
                }
            }
        },
    }
    header = "# Written by trimformer package --layout kserve; kubectl apply -f this file.\n"
    return header + yaml.safe_dump(service, sort_keys=False)
