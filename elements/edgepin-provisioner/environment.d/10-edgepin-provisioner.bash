# Build-time settings for the node. They land in /etc/edgepin/ (see README.rst).
export DIB_EDGEPIN_WHEEL=${DIB_EDGEPIN_WHEEL:-}
export DIB_EDGEPIN_CA_BUNDLE=${DIB_EDGEPIN_CA_BUNDLE:-}
export DIB_EDGEPIN_NODE_DOC=${DIB_EDGEPIN_NODE_DOC:-}
export DIB_EDGEPIN_SIGNING_CERTS=${DIB_EDGEPIN_SIGNING_CERTS:-}
export DIB_EDGEPIN_ASSIGNMENT_CERTS=${DIB_EDGEPIN_ASSIGNMENT_CERTS:-}
export DIB_EDGEPIN_RELEASE_KEY=${DIB_EDGEPIN_RELEASE_KEY:-}
export DIB_EDGEPIN_PCRS=${DIB_EDGEPIN_PCRS:-4,7,8,9}
export DIB_EDGEPIN_RESERVED_CPUS=${DIB_EDGEPIN_RESERVED_CPUS:-0}
export DIB_EDGEPIN_RECONCILE_INTERVAL=${DIB_EDGEPIN_RECONCILE_INTERVAL:-1h}
export DIB_EDGEPIN_RECONCILE_DELAY=${DIB_EDGEPIN_RECONCILE_DELAY:-10min}
export DIB_EDGEPIN_VIRT_TYPE=${DIB_EDGEPIN_VIRT_TYPE:-kvm}
export DIB_EDGEPIN_HEALTH_TIMEOUT=${DIB_EDGEPIN_HEALTH_TIMEOUT:-120}
# the guest's network: bridge (the site's LAN through br0) or none (see README.rst)
export DIB_EDGEPIN_GUEST_NETWORK=${DIB_EDGEPIN_GUEST_NETWORK:-bridge}
# the network with only the host on it: the host's address/prefix on brhost, or none
export DIB_EDGEPIN_HOST_NETWORK_ADDRESS=${DIB_EDGEPIN_HOST_NETWORK_ADDRESS:-192.168.254.1/24}
# this host release's version: a whole number, greater in later releases
export DIB_EDGEPIN_HOST_VERSION=${DIB_EDGEPIN_HOST_VERSION:-0}
# this host release's epoch (0 to 63): the TPM's host floor rises to it once it is kept
export DIB_EDGEPIN_HOST_EPOCH=${DIB_EDGEPIN_HOST_EPOCH:-0}
