#!/usr/bin/env bash
# Build nix-cri's benchmark closures with real Nix (2.8) from real files on this machine, and
# publish them, signed, as xz and zstd binary caches and as a layered OCI image (gzip layers).
#
#   hack/bench-closure.sh [OUT_DIR]        (default target/bench)
#
# What it makes (see hack/bench-closure.nix):
#   big       ~64 store paths, ~500 MB of NAR: shared libraries from /usr/lib/x86_64-linux-gnu,
#             Python 3.12's standard library and Python 3.11's site-packages (/root/.pyenv),
#             chained by references (each path refers to the previous one; busybox at the bottom)
#   quick     the first 11 paths of big (~95 MB), for `hack/bench --quick`
#   update    shares 90% of its paths with big: big's first 58, then 6 new ones (~8% of its bytes)
#   tiny1000  1000 tiny chained paths (toFile), tiny500 its first 500
#   huge      big plus the standard libraries of four more Pythons (>= 1 GB of NAR, for the RSS
#             benchmark; published to the zstd cache only, xz would take long to make)
# and OUT_DIR/{key.sec,key.pub}, cache-xz/, cache-zstd/, oci/ (one gzip tar layer per path of big),
# manifest.json (what the benchmark reads). Reruns are fast: sources, store paths, caches and
# layers are only made when missing or changed.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/../target/bench}
mkdir -p "$out"
out=$(cd "$out" && pwd)
export NIX_CONFIG="experimental-features = nix-command"
log() { printf '[bench-closure] %s\n' "$*" >&2; }

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# 1. The toolchain: static busybox as <store>/bin/{busybox,sh} (same path as hack/fixtures).
. "$here/fixtures/busybox.sh"
busybox=$(add_busybox_to_store)

# 2. The sources, with fingerprints.
python3 - "$out/sources.json.tmp" <<'EOF'
import hashlib, json, os, sys

LIB = "/usr/lib/x86_64-linux-gnu"
PY312 = "/root/.pyenv/versions/3.12.1/lib/python3.12"
SITE = "/root/.pyenv/versions/3.11.7/lib/python3.11/site-packages"

def fingerprint(src):
    h = hashlib.sha256()
    if os.path.isfile(src):
        st = os.stat(src)
        h.update(f". {st.st_size} {st.st_mtime_ns} {st.st_mode}\n".encode())
        return h.hexdigest()
    for root, dirs, files in os.walk(src):
        dirs.sort()
        for name in sorted(files + [d for d in dirs if os.path.islink(os.path.join(root, d))]):
            p = os.path.join(root, name)
            st = os.lstat(p)
            h.update(f"{os.path.relpath(p, src)} {st.st_size} {st.st_mtime_ns} {st.st_mode}\n".encode())
    return h.hexdigest()

def du(src):
    if os.path.isfile(src):
        return os.path.getsize(src)
    return sum(os.lstat(os.path.join(r, f)).st_size for r, _, fs in os.walk(src) for f in fs)

def entry(group, src):
    dest = os.path.basename(src)
    name = f"{group}-{dest}".replace("+", "p")
    for c in name:
        assert c.isalnum() or c in "+._?=-", name
    return {"name": name, "dest": dest, "src": src, "fp": fingerprint(src)}

big = []
# Base: small shared libraries and Python's stdlib modules (the first 11 paths: `quick`).
for lib in ["libstdc++.so.6.0.30", "libcrypto.so.3", "libpython3.11.so.1.0", "libicudata.so.72.1"]:
    big.append(entry("lib", f"{LIB}/{lib}"))
for d in ["xml", "email", "asyncio", "encodings", "idlelib", "__pycache__", "lib-dynload"]:
    big.append(entry("py312", f"{PY312}/{d}"))
quick = len(big) - 1
# Then the large ones: LLVM and Python's test suite.
big.append(entry("lib", f"{LIB}/libLLVM-15.so.1"))
big.append(entry("py312", f"{PY312}/test"))
# The application: site-packages directories, largest first, skipping the three largest.
dirs = sorted((d for d in os.listdir(SITE) if os.path.isdir(f"{SITE}/{d}") and not os.path.islink(f"{SITE}/{d}")),
              key=lambda d: (-du(f"{SITE}/{d}"), d))
for d in dirs[3:54]:
    big.append(entry("site", f"{SITE}/{d}"))
n_update = round(len(big) / 10)          # the update replaces the top 10% of big's paths
update_base = len(big) - n_update - 1    # index of the last shared path of big
# The new paths carry about 10% of the bytes too: the first replaces a small directory of big with
# moto (~46 MB), which big lacks; the others are big's own sources under new names.
update = [entry("site", f"{SITE}/moto")] + [dict(e) for e in big[update_base + 2:]]
# huge: on top of big, whole standard library trees of other Python versions (>= 1 GB in all).
huge = [entry(f"py{v.replace('.', '')}", f"/root/.pyenv/versions/{full}/lib/python{v}")
        for v, full in [("3.13", "3.13.0"), ("3.10", "3.10.13"), ("3.9", "3.9.18"), ("3.8", "3.8.18")]]
doc = {"big": big, "quick": quick, "update": update, "updateBase": update_base, "tiny": 1000, "huge": huge}
json.dump(doc, open(sys.argv[1], "w"), indent=1, sort_keys=True)
EOF
if ! cmp -s "$out/sources.json.tmp" "$out/sources.json"; then
  mv "$out/sources.json.tmp" "$out/sources.json"
else
  rm "$out/sources.json.tmp"
fi

# 3. Build (input-addressed: an unchanged source is a no-op). Roots live in OUT_DIR/gcroots.
# The builders run as root (no build users): the sources under /root are not readable by nixbld.
nixargs=("$here/bench-closure.nix" --argstr busybox "$busybox" --argstr sourcesFile "$out/sources.json")
mkdir -p "$out/gcroots"
for a in big quick update huge; do
  drv=$(nix-instantiate "${nixargs[@]}" -A $a 2> >(grep -v "add-root" >&2))
  log "building $a"
  nix-store -r --option sandbox false --option build-users-group "" --option substituters "" --add-root "$out/gcroots/$a" --indirect "$drv" >/dev/null 2>"$tmp/build.log" \
    || { cat "$tmp/build.log" >&2; exit 1; }
done
for a in tiny500 tiny1000; do   # toFile paths: evaluating them adds them to the store
  p=$(nix-instantiate --eval --read-write-mode --json "${nixargs[@]}" -A $a | tr -d '"')
  nix-store -r --option substituters "" --add-root "$out/gcroots/$a" --indirect "$p" >/dev/null
done
nix-instantiate --eval --strict --json "${nixargs[@]}" -A bigPaths > "$out/big-paths.json"
top() { readlink -f "$out/gcroots/$1"; }

# 4. The key; a new key invalidates the caches.
if [ ! -s "$out/key.sec" ] || [ ! -s "$out/key.pub" ]; then
  nix-store --generate-binary-cache-key nix-cri-bench-1 "$out/key.sec" "$out/key.pub"
  rm -rf "$out/cache-xz" "$out/cache-zstd"
fi

# 5. Publish, signed on upload (paths already in a cache are skipped).
roots=$(for a in big update tiny1000; do top $a; done)
for c in xz zstd; do
  log "publishing to cache-$c (slow the first time: xz; log in $out/publish-$c.log)"
  [ $c = zstd ] && roots="$roots $(top huge)"
  nix copy --option substituters "" --to "file://$out/cache-$c?compression=$c&parallel-compression=true&secret-key=$out/key.sec" $roots \
    >"$out/publish-$c.log" 2>&1 || { tail -n 20 "$out/publish-$c.log" >&2; exit 1; }
done

# 6. The OCI image: one gzip tar layer per path of big's closure, bottom first.
mkdir -p "$out/oci"
nix-store -qR "$(top big)" > "$tmp/closure"
python3 - "$out/big-paths.json" "$busybox" > "$tmp/layer-order" <<'EOF'
import json, sys
print(sys.argv[2]); [print(p) for p in json.load(open(sys.argv[1]))]
EOF
[ "$(sort "$tmp/layer-order" | uniq | wc -l)" -eq "$(wc -l < "$tmp/closure")" ] \
  || { echo "big's closure is not the chain" >&2; exit 1; }
missing=()
while read -r p; do
  b=$(basename "$p")
  [ -s "$out/oci/$b.tar.gz" ] && [ -s "$out/oci/$b.diffid" ] || missing+=("$p")
done < "$tmp/layer-order"
if [ ${#missing[@]} -gt 0 ]; then
  log "making ${#missing[@]} gzip layers"
  printf '%s\n' "${missing[@]}" | xargs -P "$(nproc)" -I{} sh -ec '
    p={}; o='"$out"'/oci/$(basename "$p")
    tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@1 -C / -cf - "${p#/}" \
      | gzip -6 -n > "$o.tar.gz.tmp"
    gzip -dc "$o.tar.gz.tmp" | sha256sum | cut -d" " -f1 > "$o.diffid"
    mv "$o.tar.gz.tmp" "$o.tar.gz"'
fi

# 7. manifest.json: everything the benchmark needs.
python3 - "$out" "$busybox" "$(top big)" "$(top quick)" "$(top update)" "$(top tiny500)" "$(top tiny1000)" "$(top huge)" \
  > "$out/manifest.json.tmp" <<'EOF'
import hashlib, json, os, subprocess, sys
out, busybox, big, quick, update, tiny500, tiny1000, huge = sys.argv[1:]

def narinfo(cache, path):
    h = os.path.basename(path)[:32]
    d = {}
    for line in open(f"{cache}/{h}.narinfo"):
        k, _, v = line.rstrip("\n").partition(": ")
        d[k] = v
    assert "Sig" in d, f"{path} is not signed in {cache}"
    return d

def closure(top):
    return subprocess.run(["nix-store", "-qR", top], check=True, capture_output=True, text=True).stdout.split()

order = [busybox] + json.load(open(f"{out}/big-paths.json"))
def describe(top, caches=("xz", "zstd")):
    paths = closure(top)
    d = {"top": top, "paths": len(paths), "nar_size": 0, "caches": {}}
    for c in caches:
        cache = f"{out}/cache-{c}"
        infos = [narinfo(cache, p) for p in paths]
        d["nar_size"] = sum(int(i["NarSize"]) for i in infos)
        d["caches"][c] = {"file_size": sum(int(i["FileSize"]) for i in infos),
                          "nars": sorted(f"{cache}/{i['URL']}" for i in infos)}
    if set(paths) <= set(order):
        layers = []
        for p in order:
            if p not in paths:
                continue
            f = f"{out}/oci/{os.path.basename(p)}.tar.gz"
            layers.append({"file": f, "size": os.path.getsize(f),
                           "digest": "sha256:" + hashlib.sha256(open(f, "rb").read()).hexdigest(),
                           "diff_id": "sha256:" + open(f[:-len(".tar.gz")] + ".diffid").read().strip()})
        d["oci_layers"] = layers
    return d

doc = {
    "public_key": open(f"{out}/key.pub").read().strip(),
    "caches": {c: f"{out}/cache-{c}" for c in ["xz", "zstd"]},
    "busybox": busybox,
    "closures": {"big": describe(big), "quick": describe(quick), "update": describe(update),
                 "tiny500": describe(tiny500), "tiny1000": describe(tiny1000),
                 "huge": describe(huge, caches=("zstd",))},
}
json.dump(doc, sys.stdout, indent=1, sort_keys=True)
EOF
mv "$out/manifest.json.tmp" "$out/manifest.json"
python3 - "$out/manifest.json" >&2 <<'EOF'
import json, sys
m = json.load(open(sys.argv[1]))
for k, c in m["closures"].items():
    sizes = ", ".join(f"{n} {v['file_size']/1e6:.0f} MB" for n, v in c["caches"].items())
    print(f"[bench-closure] {k}: {c['paths']} paths, NAR {c['nar_size']/1e6:.0f} MB, {sizes}" + (f", {len(c['oci_layers'])} gzip layers "
          f"{sum(l['size'] for l in c['oci_layers'])/1e6:.0f} MB" if "oci_layers" in c else ""))
EOF
echo "$out/manifest.json"
