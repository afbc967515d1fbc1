// The libvirt domain of a test guest: direct kernel boot of the tiny guest (kvm/guest), one qcow2 virtio disk, ACPI
// for a clean shutdown, the serial console to a file. Operators' own domains are defined by them; this is only for
// the guests that tests and the demo create.

export interface GuestDomainSpec {
  name: string;
  /** The qcow2 image the guest writes to (vda). */
  disk: string;
  kernel: string;
  initrd: string;
  /** The kernel command line (guestKernelCmdline). */
  cmdline: string;
  /** Where the serial console goes; appended to, so that a restart keeps what the guest said before. */
  serialLog: string;
  memoryMiB?: number;
  /**
   * `qemu` is TCG, the software emulator: this machine kind's /dev/kvm hangs guests (see the QEMU notes). A real KVM
   * host sets `kvm`.
   */
  accelerator?: 'qemu' | 'kvm';
}

const escapeXml = (s: string): string =>
  s.replace(/[<>&'"]/g, (c) => ({ '<': '&lt;', '>': '&gt;', '&': '&amp;', "'": '&apos;', '"': '&quot;' })[c]!);

export function guestDomainXml(spec: GuestDomainSpec): string {
  const x = (s: string) => escapeXml(s);
  return `<domain type='${spec.accelerator ?? 'qemu'}'>
  <name>${x(spec.name)}</name>
  <memory unit='MiB'>${spec.memoryMiB ?? 256}</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>${x(spec.kernel)}</kernel>
    <initrd>${x(spec.initrd)}</initrd>
    <cmdline>${x(spec.cmdline)}</cmdline>
  </os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='${x(spec.disk)}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <serial type='file'>
      <source path='${x(spec.serialLog)}' append='on'/>
      <target port='0'/>
    </serial>
    <console type='file'>
      <source path='${x(spec.serialLog)}' append='on'/>
      <target type='serial' port='0'/>
    </console>
    <memballoon model='none'/>
  </devices>
</domain>
`;
}
