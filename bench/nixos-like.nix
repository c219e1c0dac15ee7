# A closure shaped like a real NixOS system, built from this machine's own files (no
# nixpkgs): about 1,450 store paths, most of them small, a few over 20 MB, about 340 MB
# of NAR. Each path is one file or directory of the host:
#   libs:   549 libraries under 2 MB from /usr/lib/x86_64-linux-gnu (median ~75 KB)
#   docs:   600 package documentation directories from /usr/share/doc (median ~24 KB)
#   locale: 300 message catalogues from /usr/share/locale (median ~17 KB)
#   big:    the three largest libraries between 20 and 40 MB (ICU data, z3 here)
# Paths are made as groups of up to 100 outputs of one derivation (a build per path
# would take minutes); each group refers to the previous one, as packages refer to their
# dependencies. On a host with fewer files the lists wrap around (each path then holds
# its index, so it stays distinct).
let
  groupSize = 100;
  group = kind: list: g: n: prev: derivation {
    name = "bench-${kind}-${toString g}";
    system = "x86_64-linux";
    builder = "/bin/sh";
    outputs = [ "out" ] ++ builtins.genList (j: "p${toString (j + 1)}") (n - 1);
    PATH = "/usr/bin:/bin";
    args = [ "-c" ''
      set -e
      ${list} > $TMPDIR/list
      total=$(wc -l < $TMPDIR/list)
      i=${toString (g * groupSize)}
      for o in $outputs; do
        eval "dst=\$$o"
        mkdir -p $dst
        src=$(sed -n "$(( i % total + 1 ))p" $TMPDIR/list)
        cp -rL "$src" $dst/ 2>/dev/null || true
        [ $i -lt $total ] || echo $i > $dst/index
        echo "${prev}" > $dst/deps
        i=$((i + 1))
      done
    '' ];
  };
  # `count` paths of one kind, as a chain of groups.
  kind = name: list: count:
    let
      groups = (count + groupSize - 1) / groupSize;
      size = g: if count - g * groupSize < groupSize then count - g * groupSize else groupSize;
      build = acc: g: acc ++ [ (group name list g (size g) (if acc == [ ] then "" else (builtins.elemAt acc (g - 1)).out)) ];
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
