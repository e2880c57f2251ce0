# Benchmark closures for nix-cri, built with real Nix (2.8) and no nixpkgs, from real files on
# this machine. hack/bench-closure.sh writes `sourcesFile` and builds every attribute below.
#
# `busybox` is the static busybox store path (the whole toolchain, as in hack/fixtures).
# `sourcesFile` is JSON: { "big": [ { "name", "dest", "src", "fp" } … ], "update": [ … ],
# "updateBase": <index into big>, "quick": <index into big>, "tiny": <count>, "huge": [ … ] }.
#
# Every path of a chain copies one source (a host file or directory, read directly: the
# builds run with `--option sandbox false`) and records the previous path of the chain in
# nix-support/previous, with string context, so it refers to it: the closure of the n-th path
# is the first n paths (plus busybox, the bottom of every chain). `fp` fingerprints the
# source (names, sizes, mtimes), so a changed source gives a new path.
{ busybox, sourcesFile }:
let
  bb = builtins.storePath busybox;
  sources = builtins.fromJSON (builtins.readFile sourcesFile);

  copy = salt: prev: s: derivation {
    name = "bench-${s.name}${salt}";
    system = "x86_64-linux";
    builder = "${bb}/bin/sh";
    inherit prev;
    inherit (s) src fp;
    args = [ "-euc" ''
      mkdir -p $out/nix-support
      cp -R "$src" "$out/${s.dest}"
      echo "$prev" > $out/nix-support/previous
    '' ];
  };

  # [p1 p2 … pn], p1 refers to `base`, p(k+1) refers to pk.
  chain = salt: base: list:
    builtins.foldl'
      (acc: s: acc ++ [ (copy salt (if acc == [ ] then base else builtins.elemAt acc (builtins.length acc - 1)) s) ])
      [ ] list;
  last = l: builtins.elemAt l (builtins.length l - 1);

  big = chain "" bb sources.big;
  # The update: the first `updateBase + 1` paths of big, then new paths (the same sources,
  # rebuilt with another name), as an image update that changed its top layers would be.
  update = chain "-v2" (builtins.elemAt big sources.updateBase) sources.update;
  # huge: big, then more paths on top of it (>= 1 GB of NAR in all).
  huge = chain "" (last big) sources.huge;

  # Tiny chained paths: builtins.toFile, no builds. tiny n has a closure of n + 1 paths
  # (n tiny ones and busybox).
  pad = n: let s = toString n; in
    builtins.substring 0 (4 - builtins.stringLength s) "0000" + s;
  tiny = n:
    if n == 0 then bb
    else builtins.toFile "bench-tiny-${pad n}" "tiny path ${toString n}\nprevious: ${tiny (n - 1)}\n";
in {
  big = last big;
  quick = builtins.elemAt big sources.quick;
  update = last update;
  huge = last huge;
  tiny500 = tiny 499;
  tiny1000 = tiny (sources.tiny - 1);
  bigPaths = map toString big;
}
