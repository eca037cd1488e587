# qrexec-client-vm-rs %post: RPM has no diversions, so the C
# /usr/bin/qrexec-client-vm of qubes-core-qrexec-vm (and its man page) is
# renamed to *.distrib and a symlink to ours takes its place. An upgrade of
# qubes-core-qrexec-vm writes the C files back: reinstall this package then.
swap_in() {
    if [ "$(readlink "$1" 2>/dev/null)" = "$2" ]; then
        return 0
    fi
    if [ -e "$1" ] || [ -L "$1" ]; then
        mv -f "$1" "$1.distrib"
    fi
    ln -s "$2" "$1"
}
swap_in /usr/bin/qrexec-client-vm /usr/libexec/qrexec-client-vm-rs
swap_in /usr/share/man/man1/qrexec-client-vm.1.gz /usr/share/man/man1/qrexec-client-vm-rs.1.gz
