"""JSON schemas of the Kubernetes objects in deploy/k8s: the fields our manifests use, typed as
the KubeRay CRDs type them, with unknown fields rejected (as `kubectl apply --validate=strict`
does), so a mistyped field fails CI. Written for this project from the CRDs of KubeRay's
ray-operator/config/crd/bases at commit feeaf72fa (ray.io/v1: RayCluster, RayJob); the CRDs
themselves are not carried. A field the manifests start using must be added here, checked
against the CRD."""

from __future__ import annotations

from typing import Any

_NUMBER = r"(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
QUANTITY_PATTERN = rf"^(\+|-)?{_NUMBER}(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?{_NUMBER}))?$"
QUANTITY = {"anyOf": [{"type": "integer"}, {"type": "string", "pattern": QUANTITY_PATTERN}]}
"""A resource quantity (`8`, "500m", "64Gi"), as the CRDs' `x-kubernetes-int-or-string` pattern."""

STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}


def _object(required: list[str] | None = None, **properties: Any) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": required or [], "additionalProperties": False}


_KEY_REF = _object(["key"], name={"type": "string"}, key={"type": "string"}, optional={"type": "boolean"})
_ENV = _object(
    ["name"],
    name={"type": "string"},
    value={"type": "string"},
    valueFrom=_object(
        secretKeyRef=_KEY_REF,
        configMapKeyRef=_KEY_REF,
        fieldRef=_object(["fieldPath"], fieldPath={"type": "string"}, apiVersion={"type": "string"}),
    ),
)
_EXEC = _object(exec=_object(command={"type": "array", "items": {"type": "string"}}))
_CONTAINER = _object(
    ["name"],
    name={"type": "string"},
    image={"type": "string"},
    imagePullPolicy={"enum": ["Always", "IfNotPresent", "Never"]},
    command={"type": "array", "items": {"type": "string"}},
    args={"type": "array", "items": {"type": "string"}},
    workingDir={"type": "string"},
    env={"type": "array", "items": _ENV},
    ports={
        "type": "array",
        "items": _object(
            ["containerPort"],
            containerPort={"type": "integer"},
            name={"type": "string"},
            protocol={"enum": ["TCP", "UDP", "SCTP"]},
        ),
    },
    resources=_object(
        requests={"type": "object", "additionalProperties": QUANTITY},
        limits={"type": "object", "additionalProperties": QUANTITY},
    ),
    volumeMounts={
        "type": "array",
        "items": _object(
            ["name", "mountPath"],
            name={"type": "string"},
            mountPath={"type": "string"},
            readOnly={"type": "boolean"},
            subPath={"type": "string"},
        ),
    },
    securityContext=_object(
        privileged={"type": "boolean"}, runAsUser={"type": "integer"}, allowPrivilegeEscalation={"type": "boolean"}
    ),
    lifecycle=_object(postStart=_EXEC, preStop=_EXEC),
)
_VOLUME = _object(
    ["name"],
    name={"type": "string"},
    configMap=_object(name={"type": "string"}, defaultMode={"type": "integer"}),
    secret=_object(secretName={"type": "string"}),
    persistentVolumeClaim=_object(["claimName"], claimName={"type": "string"}, readOnly={"type": "boolean"}),
    emptyDir=_object(medium={"type": "string"}, sizeLimit=QUANTITY),
    hostPath=_object(["path"], path={"type": "string"}, type={"type": "string"}),
)
_POD_TEMPLATE = _object(
    metadata=_object(labels=STRING_MAP, annotations=STRING_MAP),
    spec=_object(
        ["containers"],
        containers={"type": "array", "minItems": 1, "items": _CONTAINER},
        initContainers={"type": "array", "items": _CONTAINER},
        volumes={"type": "array", "items": _VOLUME},
        nodeSelector=STRING_MAP,
        tolerations={"type": "array", "items": {"type": "object"}},
        serviceAccountName={"type": "string"},
    ),
)
_METADATA = _object(
    ["name"],
    name={"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
    namespace={"type": "string"},
    labels=STRING_MAP,
    annotations=STRING_MAP,
)

RAY_CLUSTER_SPEC = _object(
    ["headGroupSpec"],
    rayVersion={"type": "string"},
    enableInTreeAutoscaling={"type": "boolean"},
    headGroupSpec=_object(
        ["template"], rayStartParams=STRING_MAP, serviceType={"type": "string"}, template=_POD_TEMPLATE
    ),
    workerGroupSpecs={
        "type": "array",
        "items": _object(
            ["groupName", "maxReplicas", "minReplicas", "template"],
            groupName={"type": "string"},
            replicas={"type": "integer", "minimum": 0},
            minReplicas={"type": "integer", "minimum": 0},
            maxReplicas={"type": "integer", "minimum": 0},
            rayStartParams=STRING_MAP,
            template=_POD_TEMPLATE,
        ),
    },
)

SCHEMAS: dict[tuple[str, str], dict[str, Any]] = {
    ("ray.io/v1", "RayCluster"): _object(
        ["apiVersion", "kind", "metadata", "spec"],
        apiVersion={"const": "ray.io/v1"},
        kind={"const": "RayCluster"},
        metadata=_METADATA,
        spec=RAY_CLUSTER_SPEC,
    ),
    ("ray.io/v1", "RayJob"): _object(
        ["apiVersion", "kind", "metadata", "spec"],
        apiVersion={"const": "ray.io/v1"},
        kind={"const": "RayJob"},
        metadata=_METADATA,
        spec=_object(
            ["entrypoint"],
            entrypoint={"type": "string"},
            clusterSelector=STRING_MAP,
            rayClusterSpec=RAY_CLUSTER_SPEC,
            shutdownAfterJobFinishes={"type": "boolean"},
            ttlSecondsAfterFinished={"type": "integer"},
            runtimeEnvYAML={"type": "string"},
            submissionMode={"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]},
            activeDeadlineSeconds={"type": "integer"},
            backoffLimit={"type": "integer"},
        ),
    ),
    ("v1", "Secret"): _object(
        ["apiVersion", "kind", "metadata"],
        apiVersion={"const": "v1"},
        kind={"const": "Secret"},
        metadata=_METADATA,
        type={"type": "string"},
        stringData=STRING_MAP,
        data=STRING_MAP,
    ),
    ("v1", "ConfigMap"): _object(
        ["apiVersion", "kind", "metadata"],
        apiVersion={"const": "v1"},
        kind={"const": "ConfigMap"},
        metadata=_METADATA,
        data=STRING_MAP,
    ),
}
"""Schema of each (apiVersion, kind) the manifests hold."""
