"""Where the job's own sockets listen: the node's cluster address, never every interface.

A rank's process group and the group's rendezvous store (a TCPStore on rank 0) accept anyone who
can reach them, without authentication: torch's TCPStore binds all interfaces, and gloo binds the
address the host name resolves to. Here both bind the address Ray itself uses for the node
(``ray.util.get_node_ip_address()``): the store through a socket we bind and hand to it
(``master_listen_fd``), gloo and NCCL through the interface that holds the address
(``GLOO_SOCKET_IFNAME``, ``NCCL_SOCKET_IFNAME``). What else listens (Ray's own ports, the metrics
endpoint) and how to fence it is in docs/cluster.md.
"""

from __future__ import annotations

import ipaddress
import os
import socket


def interface_of(ip: str) -> str | None:
    """The name of the network interface that holds ``ip`` ("lo" for 127.0.0.1), or None."""
    import psutil  # comes with ray[default]

    for name, addresses in psutil.net_if_addrs().items():
        if any(a.address.split("%")[0] == ip for a in addresses if a.family in (socket.AF_INET, socket.AF_INET6)):
            return name
    return None


def bind_collectives(ip: str, log=print) -> str | None:
    """Make the process groups this process creates from now on listen on ``ip`` only; returns the
    interface, or None when no interface here holds ``ip`` (a NAT'd address: then gloo and NCCL
    keep their own choice, and a line says so). An interface the user chose (GLOO_SOCKET_IFNAME,
    NCCL_SOCKET_IFNAME set for the job) is kept."""
    iface = interface_of(ip)
    if iface is None:
        log(f"no network interface here holds the node address {ip}: the process groups listen where gloo/NCCL choose")
        return None
    os.environ.setdefault("GLOO_SOCKET_IFNAME", iface)  # read by gloo each time it creates a device
    os.environ.setdefault("NCCL_SOCKET_IFNAME", iface)  # NCCL's bootstrap and socket transport
    return iface


def listening_socket(ip: str) -> socket.socket:
    """A TCP socket listening on ``ip``, on a port the OS picks (for a TCPStore's master_listen_fd)."""
    family = socket.AF_INET6 if ipaddress.ip_address(ip).version == 6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((ip, 0))
    sock.listen(1024)
    return sock


def local_addresses() -> set[str]:
    """Every address of this machine's interfaces: a token sent to one of them stays on this machine."""
    import psutil

    return {
        a.address.split("%")[0]
        for addresses in psutil.net_if_addrs().values()
        for a in addresses
        if a.family in (socket.AF_INET, socket.AF_INET6)
    }
