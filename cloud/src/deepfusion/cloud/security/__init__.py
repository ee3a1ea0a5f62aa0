"""Identity, transport security and broker ACLs of a federation (design section 7).

A security folder holds the federation's CA, the broker's TLS files, password file and ACL, and the
credentials of every account: one per cloud service role and one per device. See docs/security.md.
"""

from deepfusion.cloud.security.accounts import SERVICE_ROLES, Account, Registry, Role
from deepfusion.cloud.security.errors import SecurityError
from deepfusion.cloud.security.federation import (
    DEFAULT_HOSTS,
    add_device,
    broker_listener_config,
    device_mqtt_config,
    init_security,
    list_accounts,
    revoke_device,
    service_mqtt_config,
)

__all__ = [
    "DEFAULT_HOSTS",
    "SERVICE_ROLES",
    "Account",
    "Registry",
    "Role",
    "SecurityError",
    "add_device",
    "broker_listener_config",
    "device_mqtt_config",
    "init_security",
    "list_accounts",
    "revoke_device",
    "service_mqtt_config",
]
