"""Structural schemas for the custom resources the manifests use (tests/test_manifests.py checks them).

Strimzi (Kafka, KafkaNodePool, KafkaTopic, KafkaUser) and Prometheus Operator
(ServiceMonitor, PrometheusRule) resources are custom resources; their CRD schemas are not
available from a package registry, so they are checked against these: the fields
cptd's manifests use, written from the CRDs (kafka.strimzi.io/v1beta2,
monitoring.coreos.com/v1) with their types, enums, required fields and
additionalProperties: false where the CRD has it. A typo in a field name, a wrong
type or a missing required field fails the check.
"""

from __future__ import annotations

_META = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string"},
        "namespace": {"type": "string"},
        "labels": {"type": "object"},
        "annotations": {"type": "object"},
    },
}
_QTY = {"anyOf": [{"type": "string"}, {"type": "integer"}]}
_RESOURCES = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "requests": {"type": "object", "additionalProperties": _QTY},
        "limits": {"type": "object", "additionalProperties": _QTY},
    },
}


def _cr(api_version: str, kind: str, spec: dict) -> dict:
    return {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {"apiVersion": {"const": api_version}, "kind": {"const": kind}, "metadata": _META, "spec": spec},
    }


STRIMZI_LISTENER = {
    "type": "object",
    "required": ["name", "port", "type", "tls"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "pattern": "^[a-z0-9]{1,11}$"},
        "port": {"type": "integer", "minimum": 9092},
        "type": {"enum": ["internal", "route", "loadbalancer", "nodeport", "ingress", "cluster-ip"]},
        "tls": {"type": "boolean"},
        "authentication": {"type": "object"},
        "configuration": {"type": "object"},
        "networkPolicyPeers": {"type": "array"},
    },
}
STRIMZI_VOLUME = {
    "type": "object",
    "required": ["type"],
    "additionalProperties": False,
    "properties": {
        "id": {"type": "integer", "minimum": 0},
        "type": {"enum": ["ephemeral", "persistent-claim"]},
        "size": {"type": "string"},
        "class": {"type": "string"},
        "deleteClaim": {"type": "boolean"},
        "kraftMetadata": {"enum": ["shared"]},
        "sizeLimit": {"type": "string"},
        "selector": {"type": "object"},
    },
}
CR_SCHEMAS = {
    ("kafka.strimzi.io/v1beta2", "Kafka"): _cr(
        "kafka.strimzi.io/v1beta2",
        "Kafka",
        {
            "type": "object",
            "required": ["kafka"],
            "additionalProperties": False,
            "properties": {
                "kafka": {
                    "type": "object",
                    "required": ["listeners"],
                    "additionalProperties": False,
                    "properties": {
                        "version": {"type": "string"},
                        "metadataVersion": {"type": "string"},
                        "listeners": {"type": "array", "minItems": 1, "items": STRIMZI_LISTENER},
                        "config": {"type": "object"},
                        "authorization": {"type": "object"},
                        "rack": {"type": "object"},
                        "template": {"type": "object"},
                        "resources": _RESOURCES,
                        "metricsConfig": {"type": "object"},
                    },
                },
                "entityOperator": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"topicOperator": {"type": "object"}, "userOperator": {"type": "object"}, "template": {"type": "object"}},
                },
                "cruiseControl": {"type": "object"},
                "kafkaExporter": {"type": "object"},
            },
        },
    ),
    ("kafka.strimzi.io/v1beta2", "KafkaNodePool"): _cr(
        "kafka.strimzi.io/v1beta2",
        "KafkaNodePool",
        {
            "type": "object",
            "required": ["replicas", "storage", "roles"],
            "additionalProperties": False,
            "properties": {
                "replicas": {"type": "integer", "minimum": 0},
                "roles": {"type": "array", "minItems": 1, "items": {"enum": ["controller", "broker"]}},
                "storage": {
                    "type": "object",
                    "required": ["type"],
                    "additionalProperties": False,
                    "properties": {
                        "type": {"enum": ["ephemeral", "persistent-claim", "jbod"]},
                        "volumes": {"type": "array", "items": STRIMZI_VOLUME},
                        "size": {"type": "string"},
                        "deleteClaim": {"type": "boolean"},
                    },
                },
                "resources": _RESOURCES,
                "jvmOptions": {"type": "object"},
                "template": {"type": "object"},
            },
        },
    ),
    ("kafka.strimzi.io/v1beta2", "KafkaTopic"): _cr(
        "kafka.strimzi.io/v1beta2",
        "KafkaTopic",
        {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "partitions": {"type": "integer", "minimum": 1},
                "replicas": {"type": "integer", "minimum": 1, "maximum": 32767},
                "config": {"type": "object"},
                "topicName": {"type": "string"},
            },
        },
    ),
    # Strimzi's KafkaUser (kafka.strimzi.io/v1beta2): authentication scram-sha-512 | tls | tls-external,
    # authorization simple with acls of resource {type, name, patternType} and operations.
    ("kafka.strimzi.io/v1beta2", "KafkaUser"): _cr(
        "kafka.strimzi.io/v1beta2",
        "KafkaUser",
        {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "authentication": {
                    "type": "object",
                    "required": ["type"],
                    "additionalProperties": False,
                    "properties": {"type": {"enum": ["tls", "tls-external", "scram-sha-512"]}, "password": {"type": "object"}},
                },
                "authorization": {
                    "type": "object",
                    "required": ["type", "acls"],
                    "additionalProperties": False,
                    "properties": {
                        "type": {"enum": ["simple"]},
                        "acls": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["resource"],
                                "additionalProperties": False,
                                "properties": {
                                    "resource": {
                                        "type": "object",
                                        "required": ["type"],
                                        "additionalProperties": False,
                                        "properties": {
                                            "type": {"enum": ["topic", "group", "cluster", "transactionalId"]},
                                            "name": {"type": "string"},
                                            "patternType": {"enum": ["literal", "prefix"]},
                                        },
                                    },
                                    "type": {"enum": ["allow", "deny"]},
                                    "host": {"type": "string"},
                                    "operations": {
                                        "type": "array",
                                        "minItems": 1,
                                        "items": {
                                            "enum": [
                                                "Read",
                                                "Write",
                                                "Create",
                                                "Delete",
                                                "Alter",
                                                "Describe",
                                                "ClusterAction",
                                                "AlterConfigs",
                                                "DescribeConfigs",
                                                "IdempotentWrite",
                                                "All",
                                            ]
                                        },
                                    },
                                },
                            },
                        },
                    },
                },
                "quotas": {"type": "object"},
                "template": {"type": "object"},
            },
        },
    ),
    ("monitoring.coreos.com/v1", "ServiceMonitor"): _cr(
        "monitoring.coreos.com/v1",
        "ServiceMonitor",
        {
            "type": "object",
            "required": ["selector", "endpoints"],
            "additionalProperties": False,
            "properties": {
                "selector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
                        "matchExpressions": {"type": "array"},
                    },
                },
                "namespaceSelector": {"type": "object"},
                "jobLabel": {"type": "string"},
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "targetPort": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
                            "path": {"type": "string"},
                            "scheme": {"enum": ["http", "https"]},
                            "interval": {"type": "string", "pattern": r"^(0|(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"},
                            "scrapeTimeout": {"type": "string", "pattern": r"^(0|(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"},
                            "honorLabels": {"type": "boolean"},
                            "bearerTokenSecret": {"type": "object"},
                            "authorization": {"type": "object"},
                            "tlsConfig": {"type": "object"},
                            "relabelings": {
                                "type": "array",
                                "items": {
                                    "type": "object",
                                    "additionalProperties": False,
                                    "properties": {
                                        "sourceLabels": {
                                            "type": "array",
                                            "items": {"type": "string", "pattern": "^[a-zA-Z_][a-zA-Z0-9_]*$"},
                                        },
                                        "targetLabel": {"type": "string"},
                                        "regex": {"type": "string"},
                                        "replacement": {"type": "string"},
                                        "separator": {"type": "string"},
                                        "action": {"enum": ["replace", "keep", "drop", "labelmap", "labeldrop", "labelkeep", "hashmod"]},
                                    },
                                },
                            },
                            "metricRelabelings": {"type": "array"},
                        },
                    },
                },
            },
        },
    ),
    # PrometheusRule (monitoring.coreos.com/v1): groups of alerting or recording rules, as in a Prometheus rules file.
    ("monitoring.coreos.com/v1", "PrometheusRule"): _cr(
        "monitoring.coreos.com/v1",
        "PrometheusRule",
        {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "groups": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["name"],
                        "additionalProperties": False,
                        "properties": {
                            "name": {"type": "string", "minLength": 1},
                            "interval": {"type": "string"},
                            "limit": {"type": "integer"},
                            "partial_response_strategy": {"type": "string"},
                            "rules": {
                                "type": "array",
                                "items": {
                                    "type": "object",
                                    "required": ["expr"],
                                    "additionalProperties": False,
                                    "properties": {
                                        "alert": {"type": "string"},
                                        "record": {"type": "string"},
                                        "expr": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
                                        "for": {"type": "string"},
                                        "keep_firing_for": {"type": "string"},
                                        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                                        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
                                    },
                                },
                            },
                        },
                    },
                }
            },
        },
    ),
}
