{
  description = "Thymis: a fleet manager for NixOS devices";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-26.05";

  outputs = { self, nixpkgs }:
    let
      systems = [ "x86_64-linux" "aarch64-linux" ];
      forAll = f: nixpkgs.lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});
      # A key of its own: importing a module twice (say `default` and `agent`) merges
      # it once instead of defining its package twice.
      withPackage = name: module: {
        key = "thymis#nixosModules.${name}";
        imports = [
          module
          ({ pkgs, lib, ... }: {
            config.services.${name}.package = lib.mkDefault self.packages.${pkgs.stdenv.hostPlatform.system}.default;
          })
        ];
      };
    in
    {
      packages = forAll (pkgs:
        let thymis = pkgs.callPackage ./nix/package.nix { };
        in {
          default = thymis;
          thymis = thymis;
          controller = thymis;
          agent = thymis;
          imager = thymis;
          thymisctl = thymis;
        });

      # pkgs.thymis, the modules' default package, for a nixpkgs of one's own.
      overlays.default = final: prev: { thymis = final.callPackage ./nix/package.nix { }; };

      nixosModules = {
        agent = withPackage "thymis-agent" ./modules/agent.nix;
        controller = withPackage "thymis-controller" ./modules/controller.nix;
        default = { imports = [ self.nixosModules.agent self.nixosModules.controller ]; };
      };

      checks = forAll (pkgs: {
        workspace = self.packages.${pkgs.stdenv.hostPlatform.system}.default;
        fleet = pkgs.testers.runNixOSTest (import ./tests/nixos/fleet.nix { inherit self; });
        image = pkgs.testers.runNixOSTest (import ./tests/nixos/image.nix { inherit self; });
      });

      devShells = forAll (pkgs: {
        default = pkgs.mkShell {
          inputsFrom = [ self.packages.${pkgs.stdenv.hostPlatform.system}.default ];
          packages = with pkgs; [ cargo rustc clippy rustfmt rust-analyzer nix git e2fsprogs dosfstools mtools zstd dbus ];
        };
      });

      formatter = forAll (pkgs: pkgs.nixfmt-rfc-style);
    };
}
