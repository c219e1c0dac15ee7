# The benchmark closure: about 200 MB in 8 paths, built from this machine's own files
# (no nixpkgs), in three variants: base; "modified" (one 26 MB component with every
# 14th file changed); "replaced" (one 17 MB component replaced by unrelated content).
{ variant ? "base" }:
let
  mk = name: script: derivation {
    inherit name;
    system = "x86_64-linux";
    builder = "/bin/sh";
    args = [ "-c" script ];
    PATH = "/usr/bin:/bin";
  };
  copy = name: src: mk name "mkdir -p $out && cp -rL ${src} $out/ 2>/dev/null; true";
  python = copy "bench-python" "/usr/lib/python3.11";
  perl =
    if variant == "modified" then
      mk "bench-perl" ''
        mkdir -p $out && cp -rL /usr/lib/x86_64-linux-gnu/perl $out/ 2>/dev/null
        chmod -R u+w $out
        find $out -type f | sort | awk 'NR % 14 == 0' | while read f; do echo "# modified" >> "$f"; done
        true
      ''
    else copy "bench-perl" "/usr/lib/x86_64-linux-gnu/perl";
  data =
    if variant == "replaced" then copy "bench-data" "/usr/share/locale/de /usr/share/locale/fr /usr/share/locale/es /usr/share/locale/it"
    else copy "bench-data" "/usr/share/i18n";
  zoneinfo = copy "bench-zoneinfo" "/usr/share/zoneinfo";
  bin = mk "bench-bin" "mkdir -p $out && find /usr/bin -maxdepth 1 -type f -size -300k | sort | head -400 | while read f; do cp -L $f $out/ 2>/dev/null; done; true";
  doc = mk "bench-doc" "mkdir -p $out && ls /usr/share/doc | head -500 | while read d; do cp -rL /usr/share/doc/$d $out/ 2>/dev/null; done; true";
  gcc = copy "bench-gcc" "/usr/lib/gcc/x86_64-linux-gnu/12/include /usr/lib/gcc/x86_64-linux-gnu/12/plugin";
in
mk "bench-system-${variant}" ''
  mkdir -p $out/bin
  printf '%s\n' ${python} ${perl} ${data} ${zoneinfo} ${bin} ${doc} ${gcc} > $out/components
  printf '#!/bin/sh\necho "bench system: $1"\n' > $out/bin/switch-to-configuration
  chmod +x $out/bin/switch-to-configuration
''
