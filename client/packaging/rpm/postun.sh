# qrexec-client-vm-rs %postun: on erase ($1 = 0), remove our symlinks and
# put the C files back.
swap_out() {
    if [ "$(readlink "$1" 2>/dev/null)" = "$2" ]; then
        rm -f "$1"
        if [ -e "$1.distrib" ] || [ -L "$1.distrib" ]; then
            mv -f "$1.distrib" "$1"
        fi
    fi
}
if [ "$1" = 0 ]; then
    swap_out /usr/bin/qrexec-client-vm /usr/libexec/qrexec-client-vm-rs
    swap_out /usr/share/man/man1/qrexec-client-vm.1.gz /usr/share/man/man1/qrexec-client-vm-rs.1.gz
fi
if [ "$1" = 0 ]; then
    # The completion directories belong to zsh and fish where those are
    # installed; without them nobody owns the directories we created, so
    # remove them if they are empty (rmdir never removes anything else).
    for d in /usr/share/zsh/site-functions /usr/share/zsh \
        /usr/share/fish/vendor_completions.d /usr/share/fish; do
        rmdir "$d" 2>/dev/null || true
    done
fi
