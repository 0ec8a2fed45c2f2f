#!/usr/bin/env bash
# The RabbitMQ users of the refbus services, namespace `refbus`, vhost `/`
# (made by `refbus broker-users`; issue 5). Least privilege: a service reads
# only its own agencies' inbox queues, writes only to refbus.deliveries
# and refbus.dead-letter, with routing keys that name an agency of the
# directory or a hop report, and configures nothing: import the topology
# first (deploy/rabbitmq/definitions.json, `refbus topology`) and run the
# services with REFBUS_DECLARE_TOPOLOGY=false.
#
# Passwords: REFBUS_BROKER_PASSWORD_<USER> (e.g. REFBUS_BROKER_PASSWORD_LEGAL_AID),
# else generated and printed as `user password`.
set -euo pipefail
vhost='/'
exchange='refbus.deliveries'
# user NAME PASSWORD-VARIABLE CONFIGURE WRITE READ TOPIC-WRITE
user() {
  local name=$1 var=REFBUS_BROKER_PASSWORD_$2 password
  password=${!var:-}
  [ -n "$password" ] || password=$(openssl rand -hex 16)
  rabbitmqctl -q add_user "$name" "$password" >/dev/null 2>&1     || rabbitmqctl -q change_password "$name" "$password" >/dev/null
  rabbitmqctl -q set_permissions -p "$vhost" "$name" "$3" "$4" "$5" >/dev/null
  rabbitmqctl -q set_topic_permissions -p "$vhost" "$name" "$exchange" "$6" '^$' >/dev/null
  [ -n "${!var:-}" ] || echo "$name $password"
}
user 'refbus-detention-centre' DETENTION_CENTRE '^$' '^(refbus\.deliveries|refbus\.dead-letter)$' '^(refbus\.inbox\.cq-detention-centre|refbus\.inbox\.dz-detention-centre|refbus\.inbox\.yb-detention-centre|refbus\.inbox\.sh-first-detention-centre)$' '^(event|cq-high-court|cq-procuratorate|cq-psb|cq-state-security|cq-justice-bureau|cq-bar-association|cq-legal-aid-centre|cq-detention-centre|dz-court|dz-procuratorate|dz-psb|dz-psb-investigation|dz-justice-bureau|dz-bar-committee|dz-legal-aid-centre|dz-detention-centre|dz-duty-desk|yb-court|yb-procuratorate|yb-psb|yb-justice-bureau|yb-bar-committee|yb-legal-aid-centre|yb-detention-centre|sh-psb|sh-justice-bureau|sh-bar-association|sh-legal-aid-centre|sh-first-detention-centre)\.'
user 'refbus-case-unit' CASE_UNIT '^$' '^(refbus\.deliveries|refbus\.dead-letter)$' '^(refbus\.inbox\.cq-high-court|refbus\.inbox\.cq-procuratorate|refbus\.inbox\.cq-psb|refbus\.inbox\.cq-state-security|refbus\.inbox\.dz-court|refbus\.inbox\.dz-procuratorate|refbus\.inbox\.dz-psb|refbus\.inbox\.dz-psb-investigation|refbus\.inbox\.yb-court|refbus\.inbox\.yb-procuratorate|refbus\.inbox\.yb-psb|refbus\.inbox\.sh-psb)$' '^(event|cq-high-court|cq-procuratorate|cq-psb|cq-state-security|cq-justice-bureau|cq-bar-association|cq-legal-aid-centre|cq-detention-centre|dz-court|dz-procuratorate|dz-psb|dz-psb-investigation|dz-justice-bureau|dz-bar-committee|dz-legal-aid-centre|dz-detention-centre|dz-duty-desk|yb-court|yb-procuratorate|yb-psb|yb-justice-bureau|yb-bar-committee|yb-legal-aid-centre|yb-detention-centre|sh-psb|sh-justice-bureau|sh-bar-association|sh-legal-aid-centre|sh-first-detention-centre)\.'
user 'refbus-legal-aid' LEGAL_AID '^$' '^(refbus\.deliveries|refbus\.dead-letter)$' '^(refbus\.inbox\.cq-legal-aid-centre|refbus\.inbox\.dz-legal-aid-centre|refbus\.inbox\.dz-duty-desk|refbus\.inbox\.yb-legal-aid-centre|refbus\.inbox\.sh-legal-aid-centre)$' '^(event|cq-high-court|cq-procuratorate|cq-psb|cq-state-security|cq-justice-bureau|cq-bar-association|cq-legal-aid-centre|cq-detention-centre|dz-court|dz-procuratorate|dz-psb|dz-psb-investigation|dz-justice-bureau|dz-bar-committee|dz-legal-aid-centre|dz-detention-centre|dz-duty-desk|yb-court|yb-procuratorate|yb-psb|yb-justice-bureau|yb-bar-committee|yb-legal-aid-centre|yb-detention-centre|sh-psb|sh-justice-bureau|sh-bar-association|sh-legal-aid-centre|sh-first-detention-centre)\.'
user 'refbus-justice-bureau' JUSTICE_BUREAU '^$' '^(refbus\.deliveries|refbus\.dead-letter)$' '^(refbus\.inbox\.cq-justice-bureau|refbus\.inbox\.dz-justice-bureau|refbus\.inbox\.yb-justice-bureau|refbus\.inbox\.sh-justice-bureau)$' '^(event|cq-high-court|cq-procuratorate|cq-psb|cq-state-security|cq-justice-bureau|cq-bar-association|cq-legal-aid-centre|cq-detention-centre|dz-court|dz-procuratorate|dz-psb|dz-psb-investigation|dz-justice-bureau|dz-bar-committee|dz-legal-aid-centre|dz-detention-centre|dz-duty-desk|yb-court|yb-procuratorate|yb-psb|yb-justice-bureau|yb-bar-committee|yb-legal-aid-centre|yb-detention-centre|sh-psb|sh-justice-bureau|sh-bar-association|sh-legal-aid-centre|sh-first-detention-centre)\.'
user 'refbus-bar-association' BAR_ASSOCIATION '^$' '^(refbus\.deliveries|refbus\.dead-letter)$' '^(refbus\.inbox\.cq-bar-association|refbus\.inbox\.dz-bar-committee|refbus\.inbox\.yb-bar-committee|refbus\.inbox\.sh-bar-association)$' '^(event|cq-high-court|cq-procuratorate|cq-psb|cq-state-security|cq-justice-bureau|cq-bar-association|cq-legal-aid-centre|cq-detention-centre|dz-court|dz-procuratorate|dz-psb|dz-psb-investigation|dz-justice-bureau|dz-bar-committee|dz-legal-aid-centre|dz-detention-centre|dz-duty-desk|yb-court|yb-procuratorate|yb-psb|yb-justice-bureau|yb-bar-committee|yb-legal-aid-centre|yb-detention-centre|sh-psb|sh-justice-bureau|sh-bar-association|sh-legal-aid-centre|sh-first-detention-centre)\.'
user 'refbus-tracker' TRACKER '^$' '^(refbus\.deliveries|refbus\.dead-letter)$' '^refbus\.tap$' '^(event|cq-high-court|cq-procuratorate|cq-psb|cq-state-security|cq-justice-bureau|cq-bar-association|cq-legal-aid-centre|cq-detention-centre|dz-court|dz-procuratorate|dz-psb|dz-psb-investigation|dz-justice-bureau|dz-bar-committee|dz-legal-aid-centre|dz-detention-centre|dz-duty-desk|yb-court|yb-procuratorate|yb-psb|yb-justice-bureau|yb-bar-committee|yb-legal-aid-centre|yb-detention-centre|sh-psb|sh-justice-bureau|sh-bar-association|sh-legal-aid-centre|sh-first-detention-centre)\.'
