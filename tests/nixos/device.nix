# The devices' configuration in the fleet VM test (./fleet.nix): the VM nodes import it,
# and the controller's project holds a copy of it.
{ modulesPath, ... }: {
  imports = [
    "${modulesPath}/testing/test-instrumentation.nix"
    "${modulesPath}/virtualisation/qemu-vm.nix"
  ];
  services.thymis-agent = { enable = true; configFile = "/etc/thymis/agent.toml"; };
}
