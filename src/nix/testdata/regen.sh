#!/bin/sh
# Regenerates the test vectors in this directory from real Nix (checked with Nix 2.8.0).
# Everything happens in a throw-away chroot store, so the host's /nix is never touched.
# Keys are random, so a regeneration changes the keys, signatures and the *.narinfo Sig lines;
# the store paths, NAR bytes and hashes are deterministic.
set -eu
export NIX_CONFIG="experimental-features = nix-command
substituters =
require-sigs = false"
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
trap 'chmod -R u+w "$work"; rm -rf "$work"' EXIT
root="$work/root"
cd "$work"

# The tree: the Rust tests build the same tree (nar::tests::build_sample_tree); keep them in sync.
mkdir -p tree/sub
printf 'hello\n' > tree/hello.txt
printf '#!/bin/sh\necho hi\n' > tree/run.sh
chmod 0755 tree/run.sh
ln -s hello.txt tree/link
: > tree/sub/empty
ln -s ../hello.txt tree/sub/up
nix-store --dump tree > "$here/tree.nar"
# NARs whose root is not a directory.
nix-store --dump tree/run.sh > "$here/exec-file.nar"
nix-store --dump tree/link > "$here/symlink.nar"

cat > t.nix <<'NIX'
let
  tree = builtins.path { path = ./tree; name = "tree"; };
in {
  inherit tree;
  # A text path with a reference (to tree) and a CA field.
  withRefs = builtins.toFile "with-refs" "uses ${tree}\n";
  # A fixed-output derivation output, so its narinfo has a Deriver.
  fetched = derivation {
    name = "fetched";
    builder = "builtin:fetchurl";
    system = "builtin";
    url = "file://${tree}/hello.txt";
    outputHashAlgo = "sha256";
    outputHashMode = "flat";
    outputHash = builtins.hashFile "sha256" ./tree/hello.txt;
  };
}
NIX
tree=$(nix-instantiate --store "$root" --eval --read-write-mode --json -E '(import ./t.nix).tree' | tr -d '"')
with_refs=$(nix-instantiate --store "$root" --eval --read-write-mode --json -E '(import ./t.nix).withRefs' | tr -d '"')
fetched=$(nix-build --store "$root" t.nix -A fetched --no-out-link)

nix-store --generate-binary-cache-key test-1 "$here/test-1.sk" "$here/test-1.pk"
nix-store --generate-binary-cache-key test-2 "$here/test-2.sk" "$here/test-2.pk"
nix store sign --store "$root" --key-file "$here/test-1.sk" "$tree" "$with_refs" "$fetched"
nix store sign --store "$root" --key-file "$here/test-2.sk" "$with_refs"

nix copy --store "$root" --to "file://$work/cache?compression=none" "$tree" "$with_refs" "$fetched"
nix copy --store "$root" --to "file://$work/cache-xz?compression=xz" "$tree"
cp "$work/cache/nix-cache-info" "$here/nix-cache-info"
for p in "$tree" "$with_refs" "$fetched"; do
    h=$(basename "$p" | cut -c1-32)
    n=$(basename "$p" | cut -c34-)
    cp "$work/cache/$h.narinfo" "$here/$n.narinfo"
done
h=$(basename "$tree" | cut -c1-32)
cp "$work/cache-xz/$h.narinfo" "$here/tree-xz.narinfo"
# The NAR the cache serves must be what nix-store --dump made.
cmp "$work/cache/$(sed -n 's/^URL: //p' "$here/tree.narinfo")" "$here/tree.nar"

# Hash vectors: "<algo> <base16> <nix32> <sri>" per line, one per input file.
: > "$here/hashes.txt"
printf '' > h0; printf 'hello\n' > h1; printf 'x' > h2
for f in h0 h1 h2 "$here/tree.nar"; do
    for algo in sha256 sha1 md5 sha512; do
        hex=$(nix-hash --type "$algo" --flat "$f")
        b32=$(nix-hash --type "$algo" --to-base32 "$hex")
        sri=$(nix hash to-sri --type "$algo" "$hex")
        [ "$(nix hash to-base16 --type "$algo" "$b32")" = "$hex" ]
        echo "$algo $hex $b32 $sri" >> "$here/hashes.txt"
    done
done
echo "$(nix-hash --type sha256 --base32 "$work/tree") tree-nar-hash" >> "$here/hashes.txt"
