# A closure shaped like a real NixOS system, built from this machine's own files (no
# nixpkgs): about 1,450 store paths, most of them small, a few over 20 MB, about 260 MB
# of NAR. Each path is one file or directory of the host:
#   libs:   549 libraries under 2 MB from /usr/lib/x86_64-linux-gnu (median ~75 KB)
#   docs:   600 package documentation directories from /usr/share/doc (median ~24 KB)
#   locale: 300 message catalogues from /usr/share/locale (median ~17 KB)
#   big:    the three largest libraries between 20 and 40 MB (ICU data, z3 here)
# Every path is a package of its own name and version (`bench-<group>-lib17-1.0`, the
# package `bench-lib17`), and names its own store path and the group before it, as
# binaries name their RPATH and dependencies. Paths are made as groups of up to 100
# outputs of one derivation (a build per path would take minutes); on a host with fewer
# files the lists wrap around (each path then holds its index, so it stays distinct).
#
# `bump = N` (N > 0) rebuilds it as a nixpkgs bump does: every path gets a new hash, and
# its contents differ only in the store paths they name; every tenth package has a new
# version in its name (`1.N`); every hundredth gets 16 KiB of new content.
{ bump ? 0 }:
let
  groupSize = 100;
  mod = a: b: a - (a / b) * b;
  version = i: if bump > 0 && mod i 10 == 3 then "1.${toString bump}" else "1.0";
  changed = i: bump > 0 && mod i 100 == 50;
  group = kind: list: g: n: prev:
    let
      index = j: g * groupSize + j;
      output = j: "${kind}${toString (index j)}-${version (index j)}";
      one = j: ''
        dst=${builtins.placeholder (output j)}; i=${toString (index j)}
        mkdir -p $dst
        src=$(sed -n "$(( i % total + 1 ))p" $TMPDIR/list)
        cp -rL "$src" $dst/ 2>/dev/null || true
        [ $i -lt $total ] || echo $i > $dst/index
        echo "$dst" > $dst/self
        echo "${prev}" > $dst/deps
        ${if changed (index j) then "head -c 16384 /dev/urandom > $dst/changed" else ""}
      '';
    in
    derivation {
      name = "bench-${toString g}";
      system = "x86_64-linux";
      builder = "/bin/sh";
      outputs = builtins.genList output n;
      PATH = "/usr/bin:/bin";
      BUMP = toString bump;
      args = [ "-c" ''
        set -e
        ${list} > $TMPDIR/list
        total=$(wc -l < $TMPDIR/list)
        ${builtins.concatStringsSep "\n" (builtins.genList one n)}
      '' ];
    };
  # `count` paths of one kind, as a chain of groups.
  kind = name: list: count:
    let
      groups = (count + groupSize - 1) / groupSize;
      size = g: if count - g * groupSize < groupSize then count - g * groupSize else groupSize;
      build = acc: g: acc ++ [ (group name list g (size g) (if acc == [ ] then "" else "${builtins.elemAt acc (g - 1)}")) ];
    in builtins.foldl' build [ ] (builtins.genList (g: g) groups);
  outputsOf = drvs: builtins.concatMap (d: map (o: "${d.${o}}") d.outputs) drvs;
  libs = kind "lib" "find /usr/lib/x86_64-linux-gnu -maxdepth 1 -type f -size -2M | LC_ALL=C sort" 549;
  docs = kind "doc" "find /usr/share/doc -mindepth 1 -maxdepth 1 -type d | LC_ALL=C sort" 600;
  locale = kind "locale" "find /usr/share/locale -name '*.mo' | LC_ALL=C sort" 300;
  big = kind "big" "find /usr/lib/x86_64-linux-gnu -maxdepth 1 -type f -size +20M -size -40M -printf '%s %p\\n' | sort -n | tail -3 | cut -d' ' -f2" 3;
  all = outputsOf (libs ++ docs ++ locale ++ big);
in
derivation {
  name = "bench-nixos-like-system";
  system = "x86_64-linux";
  builder = "/bin/sh";
  PATH = "/usr/bin:/bin";
  args = [ "-c" ''
    mkdir -p $out/bin
    cat > $out/components <<EOF
    ${builtins.concatStringsSep "\n" all}
    EOF
    printf '#!/bin/sh\necho "bench system: $1"\n' > $out/bin/switch-to-configuration
    chmod +x $out/bin/switch-to-configuration
  '' ];
}
