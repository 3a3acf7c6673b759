#!/usr/bin/env bash
# Self-test of the nested-kvm harness: builds smoke.c on the host, then inside
# one guest boot runs it (KVM_RUN real-mode code, expects IO then HLT exits,
# then times N IO exits) and checks that Node sees /dev/kvm.
#
#   bash tools/nested-kvm/smoke.sh [N]      (N IO round trips to time, default 2000)
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
n=${1:-2000}
mkdir -p "$here/.cache"
if ! command -v gcc > /dev/null; then
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends gcc libc6-dev
fi
gcc -O2 -Wall -Wextra -o "$here/.cache/smoke" "$here/smoke.c"
exec bash "$here/run.sh" --timeout "${TSVM_NESTED_TIMEOUT:-600}" -- "
set -e
ms() { echo \$(( (\$(date +%s%N) - \$1) / 1000000 )); }
echo \"guest uptime at job start: \$(cut -d' ' -f1 /proc/uptime)s\"
'$here/.cache/smoke' $n
s=\$(date +%s%N)
out=\$(node -e \"console.log(require('fs').existsSync('/dev/kvm'))\")
echo \"node sees /dev/kvm: \$out (node run took \$(ms \$s) ms)\"
[ \"\$out\" = true ]
echo 'NESTED-KVM SMOKE PASSED'
"
