#!/usr/bin/env bash
# A single-node Slurm cluster on this machine: to try `nnunet-segmamba sweep --cluster slurm` on a laptop, and for
# the tests (tests/test_slurm.py). Debian's packages (slurmctld, slurmd, slurm-client, munge), run as root:
#
#   tests/slurm_cluster.sh install        # apt-get install the four packages (Debian 12: Slurm 22.05)
#   tests/slurm_cluster.sh start DIR      # a munge key, slurm.conf for this machine; munged, slurmctld, slurmd
#   export SLURM_CONF=DIR/slurm.conf      # sbatch, squeue, sinfo (and the sweep) now talk to this cluster
#   tests/slurm_cluster.sh stop DIR       # cancels the cluster's jobs, stops its daemons
#
# Everything (key, state, logs, sockets, pid files) lives in DIR; nothing under /etc changes, and clusters in two
# folders do not collide (each takes free ports). The one node has this machine's CPUs and memory (`slurmd -C`) and
# no GPU; one partition, `debug`, with a time limit of $SLURM_MAX_TIME_MIN minutes (default 30). Two settings differ
# from a production cluster: no accounting database (sacct has nothing; the sweep follows its jobs with squeue), and
# cred_expire=10, so that a requeued job may start again after 10 s instead of Slurm's 120 s.
set -euo pipefail
export PATH=$PATH:/usr/sbin:/sbin  # the daemons' folder, also for users other than root

usage() {
    echo "usage: $0 install | start DIR | stop DIR" >&2
    exit 2
}

install_packages() {
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurmctld slurmd slurm-client munge
}

free_ports() {  # two TCP ports nobody listens on
    python3 -c 'import socket
sockets = [socket.socket() for _ in range(2)]
for s in sockets:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in sockets))'
}

write_config() {
    local dir=$1 ctld_port slurmd_port hardware
    read -r ctld_port slurmd_port < <(free_ports)
    # slurmd -C: "NodeName=<host> CPUs=.. Boards=.. SocketsPerBoard=.. CoresPerSocket=.. ThreadsPerCore=.. RealMemory=.."
    hardware=$(slurmd -C | head -n 1 | cut -d' ' -f2-)
    cat > "$dir/slurm.conf" <<EOF
# Written by $0 for a single-node test cluster in $dir
ClusterName=nnunet-segmamba-test
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$dir/munge/munge.socket,cred_expire=10
CredType=cred/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=5,sched_interval=5
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
KillWait=10
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
NodeName=localnode NodeHostname=$(hostname) NodeAddr=127.0.0.1 $hardware State=UNKNOWN
PartitionName=debug Nodes=localnode Default=YES MaxTime=${SLURM_MAX_TIME_MIN:-30} State=UP
EOF
}

start() {
    local dir=$1
    [ "$(id -u)" = 0 ] || { echo "$0: the daemons run as root: run it with sudo" >&2; exit 1; }
    mkdir -p "$dir"/munge "$dir"/state "$dir"/spool "$dir"/log
    chmod 755 "$dir" "$dir/munge"
    [ -f "$dir/munge/munge.key" ] || { dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
                                        chmod 400 "$dir/munge/munge.key"; }
    munged --force --socket="$dir/munge/munge.socket" --key-file="$dir/munge/munge.key" \
        --pid-file="$dir/munge/munged.pid" --log-file="$dir/log/munged.log" --seed-file="$dir/munge/munged.seed"
    write_config "$dir"
    export SLURM_CONF=$dir/slurm.conf
    slurmctld
    slurmd -N localnode
    for _ in $(seq 60); do
        if [ "$(sinfo --noheader --format=%T 2>/dev/null)" = idle ]; then
            echo "Slurm is up: export SLURM_CONF=$SLURM_CONF"
            return
        fi
        sleep 0.5
    done
    echo "$0: the node did not come up in 30 s; logs in $dir/log" >&2
    sinfo >&2 || true
    exit 1
}

end_daemon() {  # SIGTERM, SIGKILL after 20 s
    local pid_file=$1 pid
    [ -f "$pid_file" ] || return 0
    pid=$(cat "$pid_file")
    kill "$pid" 2>/dev/null || return 0
    for _ in $(seq 100); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.2
    done
    kill -9 "$pid" 2>/dev/null || true
}

stop() {
    local dir=$1
    export SLURM_CONF=$dir/slurm.conf
    if [ -f "$dir/slurmctld.pid" ] && kill -0 "$(cat "$dir/slurmctld.pid")" 2>/dev/null; then
        # slurmd leaves running jobs alone when it stops: cancel them first and wait until they are gone
        squeue --noheader --format=%A | sort -u | xargs -r scancel || true
        for _ in $(seq 60); do
            [ -z "$(squeue --noheader --format=%A 2>/dev/null)" ] && break
            sleep 0.5
        done
    fi
    end_daemon "$dir/slurmd.pid"
    end_daemon "$dir/slurmctld.pid"
    end_daemon "$dir/munge/munged.pid"
}

case "${1:-}" in
    install) install_packages ;;
    start) [ $# = 2 ] || usage; start "$(realpath -m "$2")" ;;
    stop) [ $# = 2 ] || usage; stop "$(realpath -m "$2")" ;;
    *) usage ;;
esac
