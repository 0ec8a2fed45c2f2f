#!/usr/bin/env python3
# Makes deploy/rabbitmq/cluster-definitions.json, the RabbitMQ definitions a
# refbus cluster loads at boot (`load_definitions`, deploy/rabbitmq/rabbitmq.conf,
# deploy/k8s/rabbitmq.yaml): the bus topology (`refbus topology`) plus the
# virtual host (quorum queues by default), an administrator, and one broker
# user per agency service and for the tracker with exactly the least-privilege
# permissions of `refbus broker-users` (deploy/rabbitmq/users.sh).
#
#   python3 deploy/rabbitmq/cluster-definitions.py > deploy/rabbitmq/cluster-definitions.json
#   python3 deploy/rabbitmq/cluster-definitions.py <(refbus topology) <(refbus broker-users) > defs.json
#
# Arguments: the topology JSON and the users script (defaults: definitions.json
# and users.sh beside this file). Standard library only.
#
# Passwords: REFBUS_BROKER_PASSWORD_<USER> as for users.sh (e.g.
# REFBUS_BROKER_PASSWORD_LEGAL_AID, REFBUS_BROKER_PASSWORD_ADMIN), hashed with
# a random salt. Without it a user gets its DEVELOPMENT password `dev-<user>`
# (e.g. `dev-refbus-legal-aid`), hashed with a salt derived from the user name
# so that the committed file is reproducible. Those passwords are public: a
# production deployment runs this script with its own passwords set.

import base64
import hashlib
import json
import os
import shlex
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def password_hash(password: str, salt: bytes) -> str:
    """rabbit_password_hashing_sha256: base64(salt ++ sha256(salt ++ utf8 password))."""
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


def credentials(user: str, variable: str) -> tuple[str, bytes]:
    """The password of `user` and the salt to hash it with."""
    password = os.environ.get(f"REFBUS_BROKER_PASSWORD_{variable}")
    if password:
        return password, os.urandom(4)
    # Development: a fixed salt per user keeps the output reproducible.
    return f"dev-{user}", hashlib.sha256(f"refbus development salt {user}".encode()).digest()[:4]


def read_users(script: str) -> tuple[str, str, list[list[str]]]:
    """The vhost, the deliveries exchange and the `user` lines of a users script."""
    vhost = exchange = None
    users = []
    for line in script.splitlines():
        words = shlex.split(line, comments=True)
        if not words:
            continue
        if words[0].startswith("vhost="):
            vhost = words[0].removeprefix("vhost=")
        elif words[0].startswith("exchange="):
            exchange = words[0].removeprefix("exchange=")
        elif words[0] == "user" and len(words) == 7:
            users.append(words[1:])
    if vhost is None or exchange is None or not users:
        sys.exit("cluster-definitions: the users script has no vhost=, exchange= or user lines")
    return vhost, exchange, users


def main() -> None:
    topology_path = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "definitions.json"
    users_path = Path(sys.argv[2]) if len(sys.argv) > 2 else HERE / "users.sh"
    topology = json.loads(topology_path.read_text())
    vhost, exchange, service_users = read_users(users_path.read_text())
    namespace = exchange.rsplit(".", 1)[0]

    users, permissions, topic_permissions = [], [], []

    def add(name, variable, tags, configure, write, read):
        password, salt = credentials(name, variable)
        users.append({
            "name": name,
            "password_hash": password_hash(password, salt),
            "hashing_algorithm": "rabbit_password_hashing_sha256",
            "tags": tags,
            "limits": {},
        })
        permissions.append({"user": name, "vhost": vhost,
                            "configure": configure, "write": write, "read": read})

    # The operators' user: the management UI and rabbitmqctl over HTTP. With
    # definitions loaded at boot RabbitMQ creates no `guest`.
    add(f"{namespace}-admin", "ADMIN", ["administrator"], ".*", ".*", ".*")
    for name, variable, configure, write, read, topic_write in service_users:
        add(name, variable, [], configure, write, read)
        topic_permissions.append({"user": name, "vhost": vhost, "exchange": exchange,
                                  "write": topic_write, "read": "^$"})

    description = (f"The {namespace} bus. Its users carry DEVELOPMENT passwords (dev-<user>) "
                   "unless made with REFBUS_BROKER_PASSWORD_<USER>: see "
                   "deploy/rabbitmq/cluster-definitions.py.")
    definitions = {
        "rabbit_version": topology.get("rabbit_version", "3.13.0"),
        "users": users,
        "vhosts": [{
            "name": vhost,
            "description": description,
            "tags": [],
            "default_queue_type": "quorum",
            "metadata": {"description": description, "tags": [], "default_queue_type": "quorum"},
        }],
        "permissions": permissions,
        "topic_permissions": topic_permissions,
        "parameters": [],
        "global_parameters": [],
        "policies": [],
        "exchanges": topology["exchanges"],
        "queues": topology["queues"],
        "bindings": topology["bindings"],
    }
    json.dump(definitions, sys.stdout, indent=2, sort_keys=True, ensure_ascii=False)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
