#!/usr/bin/env bash
# manage-backup-dr.sh — the seed's management script for backups and disaster recovery.
#
# It does nothing itself: every verb becomes one or two kybdr-agent commands, so the agent stays the one
# place where backups, failover guards and history live. What the script adds is the seed's calling
# convention: an environment name (-e production) instead of a config path, a --dr-region that must
# agree with the configuration before anything is failed over, and an explanation (not silence) for the
# seed's -v VAULT, which names an AWS Backup vault the agent does not drive.
#
# Environment:
#   KYBDR_AGENT       the agent command (default: kybdr-agent); may be several words, split on blanks,
#                     e.g. "/opt/kybdr/venv/bin/python -m kybdr_agent" (no word may contain a blank)
#   KYBDR_CONFIG_DIR  where -e ENV looks for ENV.toml (default: /etc/kybdr-agent)
#   KYBDR_PYTHON      a python3 to read the agent's JSON configuration with (default: python3)
set -euo pipefail

readonly PROG=${0##*/}
readonly EX_USAGE=64
readonly EX_CONFIG=78

usage() {
	cat <<EOF
Usage: $PROG VERB [options] [-- agent arguments]

Backup and disaster-recovery operations, delegated to kybdr-agent (\$KYBDR_AGENT).

Backup verbs:
  backup          take a backup of the configured databases now (kybdr-agent backup)
  list            list completed backups (kybdr-agent list)
  show ID         show one backup's manifest (kybdr-agent show)
  restore ID      restore a backup into a new database (kybdr-agent restore; needs --target-database)
  validate ID     check a backup's integrity (kybdr-agent validate)
  cleanup         delete backups the retention policies no longer keep (kybdr-agent cleanup)
  stats           backup statistics (kybdr-agent stats)
  status          the agent's state and recent jobs, and the DR state when DR is enabled
  test            restore drill of the newest backups, and a DR test failover when DR is enabled

Disaster-recovery verbs (kybdr-agent dr ...):
  failover        fail over to the DR region now (guards apply; --force skips the soft ones)
  failback        switch back to the primary region (a zero-loss planned switchover)
  test-failover   non-disruptive failover drill: every guard and step timed, test record only
  test-failback   non-disruptive failback drill
  history         failover and drill history
  health          each region's and each witness's latest probe
  rejoin          on the old primary's host: rewind it and start it as a standby of the new primary
  resume          leave the halted state after an operator has checked what happened
  auto-failover enable|disable
                  turn automatic failover on or off
  auto-failback enable|disable
                  turn automatic failback on or off

Options (anywhere after the verb):
  -e, --env ENV        use \${KYBDR_CONFIG_DIR:-/etc/kybdr-agent}/ENV.toml as the configuration
  -c, --config FILE    use FILE as the configuration (instead of -e)
  --dr-region REGION   refuse to run unless REGION is the configuration's dr.dr_region
  -v, --vault VAULT    accepted for the seed's examples: the AWS Backup vault of the RDS plan, which
                       terraform manages and AWS Backup drives; the agent does not use it (explained)
  --force              passed on to the agent (failover: skip soft guards; restore: replace)
  --json               passed on to the agent: machine-readable output
  --verbose            the agent logs progress to stderr
  -h, --help           this help
  Anything else after the verb (IDs, --database, --target-database ...) is passed on to the agent.

Examples:
  $PROG backup -e production -v kyb-platform-backup-vault
  $PROG failover --dr-region us-east-1
  $PROG status
  $PROG test
EOF
}

say() { printf '%s: %s\n' "$PROG" "$*" >&2; }
die() {
	local code=$1
	shift
	say "$@"
	exit "$code"
}

read -r -a AGENT <<<"${KYBDR_AGENT:-kybdr-agent}"
((${#AGENT[@]})) || die "$EX_USAGE" "KYBDR_AGENT is empty"
read -r -a PY <<<"${KYBDR_PYTHON:-python3}"

verb=""
env_name=""
config=""
vault=""
dr_region=""
verbose=0
json=0
args=()

need_value() { [[ $# -ge 2 && -n $2 ]] || die "$EX_USAGE" "$1 needs a value (see $PROG --help)"; }

while (($#)); do
	case $1 in
	-h | --help)
		usage
		exit 0
		;;
	-e | --env | --environment)
		need_value "$@"
		env_name=$2
		shift 2
		;;
	--env=* | --environment=*)
		env_name=${1#*=}
		shift
		;;
	-c | --config)
		need_value "$@"
		config=$2
		shift 2
		;;
	--config=*)
		config=${1#*=}
		shift
		;;
	-v | --vault)
		need_value "$@"
		vault=$2
		shift 2
		;;
	--vault=*)
		vault=${1#*=}
		shift
		;;
	--dr-region)
		need_value "$@"
		dr_region=$2
		shift 2
		;;
	--dr-region=*)
		dr_region=${1#*=}
		shift
		;;
	--verbose)
		verbose=1
		shift
		;;
	--)
		shift
		args+=("$@")
		break
		;;
	*)
		if [[ -z $verb ]]; then
			[[ $1 != -* ]] || die "$EX_USAGE" "unknown option $1 before the verb (see $PROG --help)"
			verb=$1
		else
			[[ $1 != --json ]] || json=1
			args+=("$1")
		fi
		shift
		;;
	esac
done

[[ -n $verb ]] || {
	usage >&2
	exit "$EX_USAGE"
}
[[ $verb != help ]] || {
	usage
	exit 0
}

case $verb in
backup | list | show | restore | validate | cleanup | stats | status | test) ;;
failover | failback | test-failover | test-failback | history | health | rejoin | resume) ;;
auto-failover | auto-failback)
	case ${args[0]:-} in
	enable | disable) ;;
	*) die "$EX_USAGE" "$verb needs 'enable' or 'disable' (e.g. $PROG $verb enable)" ;;
	esac
	;;
*) die "$EX_USAGE" "unknown verb '$verb' (see $PROG --help for the list)" ;;
esac

# --- which configuration -------------------------------------------------------------------------
if [[ -n $env_name ]]; then
	[[ -z $config ]] || die "$EX_USAGE" "-e $env_name and -c $config both name a configuration: give one"
	[[ $env_name =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]] ||
		die "$EX_USAGE" "'$env_name' is not an environment name (letters, digits, '.', '_', '-')"
	config_dir=${KYBDR_CONFIG_DIR:-/etc/kybdr-agent}
	config=$config_dir/$env_name.toml
	[[ -f $config ]] || die "$EX_CONFIG" "no configuration for environment '$env_name': $config does not exist" \
		"(install it there, or set KYBDR_CONFIG_DIR to the folder that holds $env_name.toml)"
fi
global=()
[[ -z $config ]] || global+=(--config "$config")
((verbose == 0)) || global+=(-v)
where=${config:-the default configuration}

# --- the seed's -v VAULT ---------------------------------------------------------------------------
if [[ -n $vault ]]; then
	say "note: -v $vault is not used. The agent does not drive AWS Backup: that vault holds the RDS" \
		"backup plan's recovery points, which AWS Backup takes on its own schedule and terraform manages" \
		"(terraform/backup.tf). '$verb' works on the agent's own repository ([repository] in $where)."
fi

agent() {
	((verbose == 0)) || say "running: ${AGENT[*]} ${global[*]+${global[*]}} $*"
	"${AGENT[@]}" ${global[@]+"${global[@]}"} "$@"
}

# The effective configuration (file plus KYBDR_* overrides), as the agent itself reads it.
config_json=""
load_config() {
	[[ -z $config_json ]] || return 0
	local rc=0
	config_json=$("${AGENT[@]}" ${global[@]+"${global[@]}"} config check --json) || rc=$?
	((rc == 0)) || die "$rc" "cannot read $where (kybdr-agent config check failed, status $rc)"
}

# dr_setting NAME: the configuration's dr.NAME ("" when unset; booleans as true/false). Call
# load_config first, in this shell: a command substitution is a subshell, which would not keep it.
dr_setting() {
	"${PY[@]}" -c '
import json, sys
value = (json.load(sys.stdin).get("dr") or {}).get(sys.argv[1])
print("" if value is None else str(value).lower() if isinstance(value, bool) else value)
' "$1" <<<"$config_json"
}

if [[ -n $dr_region ]]; then
	load_config
	configured=$(dr_setting dr_region)
	[[ -n $configured ]] ||
		die "$EX_CONFIG" "--dr-region $dr_region given, but $where sets no dr.dr_region: refusing to guess"
	[[ $configured == "$dr_region" ]] ||
		die "$EX_CONFIG" "--dr-region $dr_region does not match dr.dr_region = \"$configured\" in $where:" \
			"refusing to act on a region this agent does not manage"
fi

# Two commands (status, test): both run; the script fails if either did.
both() {
	local first=$1 second=$2 rc=0 enabled
	load_config
	enabled=$(dr_setting enabled)
	agent "$first" ${args[@]+"${args[@]}"} || rc=$?
	if [[ $enabled == true ]]; then
		local extra=()
		((json == 0)) || extra=(--json)
		agent dr "$second" ${extra[@]+"${extra[@]}"} || {
			local r=$?
			((rc)) || rc=$r
		}
	fi
	exit "$rc"
}

case $verb in
backup | list | show | restore | validate | cleanup | stats) agent "$verb" ${args[@]+"${args[@]}"} ;;
status) both status status ;;
test) both test test-failover ;;
*) agent dr "$verb" ${args[@]+"${args[@]}"} ;;
esac
