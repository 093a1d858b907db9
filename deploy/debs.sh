# Sourced by setup.sh and install.sh: ensure_debs WHO PACKAGE... installs the Debian packages
# missing (as root; otherwise says which and exits 1), without starting any service they bring
# on the host (sshd would listen on every address): a policy-rc.d refuses while apt runs.
ensure_debs() {
    local who=$1 p missing=()
    shift
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" -ne 0 ]; then
        echo "$who: missing Debian packages: ${missing[*]}; run as root or apt-get install them" >&2
        exit 1
    fi
    echo "$who: installing Debian packages ${missing[*]}" >&2
    apt-get update -qq
    local policy=/usr/sbin/policy-rc.d ours=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod +x "$policy" && ours=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    if [ "$ours" = 1 ]; then rm -f "$policy"; fi
}
