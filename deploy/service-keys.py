#!/usr/bin/env python3
# Sorts the signing keys made by `refbus keys generate --out KEYS` into one
# directory per service, so that each service holds only its own agencies'
# keys (README, "Signed messages"):
#
#   python3 deploy/service-keys.py KEYS OUT [DIRECTORY]
#
# OUT/<service>/<agency>.key for the five agency services and the lawyer service (the agency kinds
# each serves, as `refbus serve` does), OUT/tracker/refbus-tracker.key for the
# tracker; files copied with mode 0600. DIRECTORY defaults to
# deploy/local/directory.toml. Then, with systemd, OUT/<service> becomes
# /etc/refbus/keys/<service> (deploy/systemd); on Kubernetes, the Secret
# refbus-keys-<service> (deploy/k8s/secrets.example.yaml):
#   kubectl -n refbus create secret generic refbus-keys-legal-aid --from-file=OUT/legal-aid
# Standard library only (Python 3.11+).

import shutil
import sys
import tomllib
from pathlib import Path

# The agency kinds each agency service serves (refbus_gateway::AgencyService::kinds).
SERVICES = {
    "detention-centre": {"detention_centre"},
    "case-unit": {"case_unit"},
    "legal-aid": {"legal_aid_office", "duty_lawyer_desk"},
    "justice-bureau": {"justice_bureau"},
    "bar-association": {"bar_association"},
    "lawyer-service": {"lawyer_service"},
}
TRACKER_ID = "refbus-tracker"


def main() -> None:
    if len(sys.argv) not in (3, 4):
        sys.exit("usage: service-keys.py KEYS OUT [DIRECTORY]")
    keys, out = Path(sys.argv[1]), Path(sys.argv[2])
    directory = Path(sys.argv[3] if len(sys.argv) == 4 else "deploy/local/directory.toml")
    agencies = tomllib.loads(directory.read_text())["agency"]
    plan = {"tracker": [TRACKER_ID]}
    for service, kinds in SERVICES.items():
        plan[service] = [a["id"] for a in agencies if a["kind"] in kinds]
    missing = []
    for service, signers in plan.items():
        target = out / service
        target.mkdir(parents=True, exist_ok=True, mode=0o700)
        for signer in signers:
            source = keys / f"{signer}.key"
            if not source.exists():
                missing.append(str(source))
                continue
            shutil.copyfile(source, target / source.name)
            (target / source.name).chmod(0o600)
        print(f"{target}: {len(signers)} keys")
    if missing:
        sys.exit("service-keys: missing " + ", ".join(missing))


if __name__ == "__main__":
    main()
